"""LengthBucketSampler: every example once, little padding, and no long-to-short sweep."""
import random

import torch
from datasets import Dataset
from transformers import TrainingArguments
from transformers.trainer_pt_utils import LengthGroupedSampler

from peftkit.batching import LengthBucketSampler
from peftkit.train import AdapterTrainer
from conftest import make_tiny

_rng = random.Random(0)
LENGTHS = [_rng.randint(3, 64) for _ in range(2003)]  # 2003: the last batch is short
BATCH = 8


def batches(order: list[int]) -> list[list[int]]:
    return [order[i:i + BATCH] for i in range(0, len(order), BATCH)]  # as the DataLoader cuts them


def padding(order: list[int]) -> int:
    return sum(len(b) * max(LENGTHS[i] for i in b) - sum(LENGTHS[i] for i in b) for b in batches(order))


def falling_pairs(order: list[int]) -> float:
    """Share of consecutive batches whose longest example is shorter than the previous batch's."""
    tops = [max(LENGTHS[i] for i in b) for b in batches(order)]
    return sum(b < a for a, b in zip(tops, tops[1:])) / (len(tops) - 1)


def test_every_example_once_with_little_padding_in_random_batch_order():
    order = list(LengthBucketSampler(LENGTHS, BATCH, seed=1))
    assert sorted(order) == list(range(len(LENGTHS)))
    shuffled = torch.randperm(len(LENGTHS), generator=torch.Generator().manual_seed(1)).tolist()
    assert padding(order) < 0.1 * padding(shuffled)  # the DataLoader's cuts fall on the buckets' batches
    # transformers' sampler sweeps each mega-batch long to short; ours has no direction
    grouped = list(LengthGroupedSampler(BATCH, lengths=LENGTHS, generator=torch.Generator().manual_seed(1)))
    assert falling_pairs(grouped) > 0.9
    assert 0.35 < falling_pairs(order) < 0.65
    assert len(batches(order)[-1]) == len(LENGTHS) % BATCH  # the short batch comes last
    assert max(LENGTHS) in [LENGTHS[i] for i in batches(order)[0]]  # out-of-memory shows at the first step


def test_same_seed_and_epoch_same_order_and_each_epoch_a_new_one():
    first, second = LengthBucketSampler(LENGTHS, BATCH, seed=3), LengthBucketSampler(LENGTHS, BATCH, seed=3)
    epoch0 = list(first)
    first.set_epoch(1)
    epoch1 = list(first)
    assert epoch0 == list(second)  # a resumed run sees the order the interrupted one saw
    assert epoch1 != epoch0 and sorted(epoch1) == sorted(epoch0)
    second.set_epoch(1)
    assert list(second) == epoch1


def test_the_trainer_batches_by_length_only_when_asked(tmp_path):
    data = Dataset.from_dict({"input_ids": [[1] * n for n in LENGTHS[:100]], "labels": [0] * 100})

    def sampler(strategy):
        args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=BATCH, use_cpu=True,
                                 train_sampling_strategy=strategy, data_seed=5, report_to=[])
        return AdapterTrainer(model=make_tiny("bert", "cls"), args=args, train_dataset=data)._get_train_sampler()

    bucketed = sampler("group_by_length")
    assert isinstance(bucketed, LengthBucketSampler) and bucketed.lengths == LENGTHS[:100]
    assert list(bucketed) == list(LengthBucketSampler(LENGTHS[:100], BATCH, seed=5))
    assert isinstance(sampler("random"), torch.utils.data.RandomSampler)

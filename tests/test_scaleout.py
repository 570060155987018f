"""Several GPUs, tested on a CPU: the shipped accelerate configs (recipes/launch/) are read by
accelerate's own launcher code, and a peftkit QLoRA base shards and trains under FSDP2.

accelerate 1.16 runs FSDP on GPUs (and other accelerators) only: on a CPU, `accelerate launch` with
an FSDP config, or the Trainer's own `fsdp=` argument, quietly trains with DDP instead
(distributed_type MULTI_CPU). So the FSDP test below shards with torch's fully_shard directly, as
accelerate's FSDP2 preparation does (one unit per decoder layer, then the whole model, bf16 mixed
precision), over gloo on two CPU processes. DeepSpeed is not installed here and is not tested
beyond its config."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "recipes" / "launch"
CONFIGS = {"fsdp-qlora.yaml": "FSDP", "deepspeed-zero3.yaml": "DEEPSPEED"}


def launcher_environment(config: Path) -> dict:
    """The environment `accelerate launch --config_file config` gives each process it starts,
    computed by accelerate's own launcher code (nothing is started)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config), "-m", "peftkit", "train", "x"])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)  # as launch_command does
        return prepare_deepspeed_cmd_env(args)[1]
    return prepare_multi_gpu_env(args)


@pytest.mark.parametrize("name", CONFIGS)
def test_launch_configs_hold_only_keys_accelerate_knows(name):
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import launch_command_parser

    config = ClusterConfig.from_yaml_file(str(LAUNCH / name))  # refuses unknown top-level keys
    assert config.distributed_type.value == CONFIGS[name]
    assert config.mixed_precision == "no"  # the recipe's train.precision decides, as the 4-bit storage does
    # accelerate copies fsdp_config and deepspeed_config keys onto its launch options and ignores the
    # ones it lacks, so a misspelt key would pass silently: each must be a launch option
    options = {action.dest for action in launch_command_parser()._actions}
    nested = {**config.fsdp_config, **config.deepspeed_config}
    assert nested and set(nested) <= options, sorted(set(nested) - options)
    text = (LAUNCH / name).read_text()
    assert f"accelerate launch --config_file recipes/launch/{name} train.py" in text
    assert "--num_machines 2" in text and "--machine_rank" in text and "--main_process_ip" in text


def test_fsdp_config_gives_fsdp2_full_shard_per_decoder_layer(monkeypatch):
    from accelerate import FullyShardedDataParallelPlugin

    for key, value in launcher_environment(LAUNCH / "fsdp-qlora.yaml").items():
        monkeypatch.setenv(key, value)
    assert os.environ["ACCELERATE_USE_FSDP"] == "true"
    plugin = FullyShardedDataParallelPlugin()  # reads the launcher's environment, as in each process
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert plugin.auto_wrap_policy.__name__ == "transformer_auto_wrap_policy"
    assert plugin.state_dict_type.name == "SHARDED_STATE_DICT"
    assert not plugin.cpu_ram_efficient_loading and not plugin.activation_checkpointing
    assert plugin.mixed_precision_policy is None  # set by the Trainer from the recipe's precision


def test_deepspeed_config_gives_zero3_with_the_trainer_filling_the_rest(monkeypatch):
    from accelerate.utils import DeepSpeedPlugin

    for key, value in launcher_environment(LAUNCH / "deepspeed-zero3.yaml").items():
        monkeypatch.setenv(key, value)
    plugin = DeepSpeedPlugin()  # builds DeepSpeed's JSON config; DeepSpeed itself is not needed for that
    ds = plugin.deepspeed_config
    assert plugin.zero_stage == 3 and plugin.zero3_init_flag
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "none"
    # left to the Trainer, which fills them from the recipe
    assert ds["gradient_accumulation_steps"] == ds["gradient_clipping"] == ds["train_micro_batch_size_per_gpu"] == "auto"


def test_launch_configs_are_not_listed_as_recipes():
    from peftkit.recipe import recipe_names

    assert set(recipe_names()).isdisjoint({"fsdp-qlora", "deepspeed-zero3", "launch"})
    for path in LAUNCH.glob("*.yaml"):
        assert "name" not in yaml.safe_load(path.read_text())  # an accelerate config, not a recipe


@pytest.mark.parametrize("launched_for", ["ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"])
def test_4bit_weights_are_stored_in_the_compute_dtype_under_fsdp_and_deepspeed(monkeypatch, launched_for):
    from peftkit.loading import bnb_config

    for flag in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(flag, raising=False)
    assert bnb_config("nf4", torch.bfloat16).bnb_4bit_quant_storage == torch.uint8  # one process, or DDP
    monkeypatch.setenv(launched_for, "true")  # what `accelerate launch` sets for the configs' distributed_type
    for dtype in (torch.bfloat16, torch.float32):
        config = bnb_config("nf4", dtype)
        assert config.bnb_4bit_quant_storage == config.bnb_4bit_compute_dtype == dtype
    assert bnb_config("8bit", torch.bfloat16).load_in_8bit


@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16])
def test_storage_dtype_changes_no_output_gradient_or_merge(tmp_path, monkeypatch, compute):
    """Float storage is the same bytes as uint8: nf4 logits, a QLoRA step's gradients and the
    merged weights are bit-identical."""
    import peftkit
    from conftest import make_tiny, tiny_inputs

    make_tiny("llama", "lm").save_pretrained(tmp_path)
    inputs = tiny_inputs()

    def run(sharded):
        monkeypatch.setenv("ACCELERATE_USE_FSDP", str(sharded).lower())
        base = peftkit.load_model(str(tmp_path), quantize="nf4", matmul_dtype=compute)
        packed = base.model.layers[0].mlp.up_proj.weight.dtype
        with torch.no_grad():
            logits = base(**inputs).logits
        torch.manual_seed(3)
        model = peftkit.attach(base, "qlora", gradient_checkpointing=False).eval()  # eval: no dropout
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=compute == torch.bfloat16):
            model(**inputs, labels=inputs["input_ids"]).loss.backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        merged = peftkit.merge(model).model.layers[0].mlp.up_proj.weight.detach()
        return packed, logits, grads, merged

    packed, logits, grads, merged = run(sharded=True)
    packed_u8, logits_u8, grads_u8, merged_u8 = run(sharded=False)
    assert packed == compute and packed_u8 == torch.uint8
    assert torch.equal(logits, logits_u8) and torch.equal(merged, merged_u8)
    assert len(grads) == len(grads_u8) and all(torch.equal(a, b) for a, b in zip(grads, grads_u8))


def test_float_stored_4bit_weights_are_not_read_as_weights_by_the_fingerprint(tmp_path, monkeypatch):
    """Their floats are bytes of 4-bit codes (some read as NaN): the fingerprint skips them, so an
    adapter trained under FSDP still loads onto the same base in full precision or in uint8 4-bit."""
    import peftkit
    from conftest import make_tiny
    from peftkit.fingerprint import check_same_base, fingerprint

    make_tiny("llama", "lm").save_pretrained(tmp_path)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    sharded = fingerprint(peftkit.load_model(str(tmp_path), quantize="nf4", matmul_dtype=torch.bfloat16))
    assert not any(name.endswith("proj.weight") for name in sharded["signatures"])
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    for base in (peftkit.load_model(str(tmp_path)), peftkit.load_model(str(tmp_path), quantize="nf4")):
        check_same_base(sharded, fingerprint(base), "tiny", "tiny")  # no error


def test_each_process_loads_its_quantized_base_on_its_own_gpu(monkeypatch):
    from peftkit.loading import quantized_device

    assert quantized_device() == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert quantized_device() == 0  # one process, no launcher
    monkeypatch.setenv("LOCAL_RANK", "3")  # set by torchrun and accelerate launch
    assert quantized_device() == 3


FSDP_WORKER = """
import sys
import torch, torch.distributed as dist
from accelerate import Accelerator, FullyShardedDataParallelPlugin
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
sys.path.insert(0, {tests!r})
import peftkit
from conftest import make_tiny, tiny_inputs

# What accelerate does with FSDP on a CPU: DDP (this also starts the gloo process group)
accelerator = Accelerator(cpu=True, fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2))
assert accelerator.num_processes == 2
rank, folder = dist.get_rank(), {folder!r}

def report(line):
    # every process's line, printed by the first in rank order (prints of two processes interleave)
    lines = [None, None]
    dist.all_gather_object(lines, line)
    if rank == 0:
        print(*lines, sep="\\n", flush=True)

report(f"accelerate: {{accelerator.distributed_type.value}}")
if rank == 0:
    make_tiny("llama", "lm").save_pretrained(folder)
dist.barrier()
ids = tiny_inputs(batch=4, length=12)["input_ids"]

def qlora(matmul_dtype):
    torch.manual_seed(3)
    base = peftkit.load_model(folder, quantize="nf4", matmul_dtype=matmul_dtype)
    return peftkit.attach(base, "qlora", gradient_checkpointing=False).eval()  # eval: no dropout

def step(model, rows, autocast=False):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=rows, labels=rows).loss
    loss.backward()
    return loss.detach()

# One process, whole batch: the mean over the two halves the processes get
reference = qlora(torch.bfloat16)
ref_loss = (step(reference, ids[:2], True) + step(reference, ids[2:], True)) / 2
ref_grads = {{n: p.grad / 2 for n, p in reference.named_parameters() if p.requires_grad}}

def sharded(matmul_dtype):
    # accelerate's FSDP2 preparation: one unit per decoder layer, then the model; its bf16 policy
    model = qlora(matmul_dtype)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16)
    mesh = init_device_mesh("cpu", (2,))
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    return fully_shard(model, mesh=mesh, mp_policy=policy)

model = sharded(torch.bfloat16)
packed = model.base_model.model.model.layers[0].mlp.up_proj.base_layer.weight
assert type(packed).__name__ == "DTensor" and packed.dtype == torch.bfloat16
assert packed.to_local().shape[0] * 2 == packed.shape[0]  # the 4-bit weights are sharded too
loss = step(model, ids[2 * rank: 2 * rank + 2])
dist.all_reduce(loss)
grads = {{n: p.grad.full_tensor() for n, p in model.named_parameters() if p.requires_grad}}
assert grads.keys() == ref_grads.keys()
worst = max(((grads[n] - g).norm() / g.norm()).item() for n, g in ref_grads.items() if g.norm() > 0)
report(f"loss {{loss.item() / 2:.5f}} reference {{ref_loss.item():.5f}} worst gradient error {{worst:.4f}}")
assert abs(loss.item() / 2 - ref_loss.item()) < 2e-2 and worst < 5e-2

# 4-bit weights stored as fp32 (a recipe in fp32) under a bf16 policy: the cast breaks them
try:
    step(sharded(torch.float32), ids[2 * rank: 2 * rank + 2])
    outcome = "trained"
except RuntimeError as err:
    outcome = "failed: " + str(err).splitlines()[0][:80]
report(f"fp32-stored weights under bf16: {{outcome}}")
# leave the group before exit: a gloo thread still running at interpreter exit aborts the process
# ("terminate called without an active exception"), as it did now and then after the failed step above
dist.barrier()
dist.destroy_process_group()
"""


def test_fsdp2_shards_and_trains_a_qlora_base_on_two_cpu_processes(tmp_path):
    """Two processes, gloo: the 4-bit weights (bf16 storage) are sharded and one step matches one
    process on the whole batch (bf16 rounding apart); fp32-stored weights do not survive FSDP's bf16
    cast, which is why the configs leave mixed precision to the recipe."""
    worker = tmp_path / "worker.py"
    worker.write_text(textwrap.dedent(FSDP_WORKER.format(tests=str(ROOT / "tests"), folder=str(tmp_path / "tiny"))))
    # ACCELERATE_USE_FSDP as `accelerate launch --config_file recipes/launch/fsdp-qlora.yaml` sets it
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "ACCELERATE_USE_FSDP": "true"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--standalone", str(worker)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert done.stdout.count("accelerate: MULTI_CPU") == 2  # accelerate's FSDP is GPU-only: DDP here
    assert "worst gradient error" in done.stdout
    assert done.stdout.count("fp32-stored weights under bf16: failed") == 2


def test_peftkit_train_refuses_a_sharded_gpu_launch_before_any_work(monkeypatch, tmp_path):
    import torch

    from peftkit.errors import PeftkitError
    from peftkit.recipe import load_recipe
    from peftkit.train import train

    loaded = []
    monkeypatch.setattr("peftkit.train.set_up", lambda *a, **k: loaded.append(1))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(PeftkitError, match="does not yet evaluate and export a model sharded by FSDP"):
        train(load_recipe("sentiment-lora", [f"output_dir={tmp_path}"]))
    assert not loaded

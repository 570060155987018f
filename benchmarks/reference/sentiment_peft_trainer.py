"""The reference for the sentiment benchmark: LoRA on MiniLM-L6 for Rotten Tomatoes,
written the way it is done today with Hugging Face peft and a plain transformers
Trainer (the pattern of the transformers and peft docs), without peftkit.

`peftkit bench train benchmarks/train-sentiment.yaml` calls build() with the
recipe's data and hyperparameters and times trainer.train(). The LoRA settings are
those of peftkit's `lora` preset (r=8, alpha 16, dropout 0.05, query/value), so
both train the same parameters.

`tuned=True` is the `reference-tuned` variant: what a user who knows Trainer sets on top,
from the transformers performance guides, keeping the model and data as they are:
length-grouped batches, padding to a multiple of 8, bf16 autocast (the driver passes
bf16=True where the hardware computes bf16 natively: a bf16 GPU, or a CPU with
AVX512-BF16 or AMX) and the fused AdamW kernel.
"""
import torch
from peft import LoraConfig, get_peft_model
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                          TrainingArguments, set_seed)

TUNED = {"train_sampling_strategy": "group_by_length", "optim": "adamw_torch_fused"}


def build(model_dir, splits, output_dir, *, lr, batch_size, epochs, max_steps, max_length, warmup_ratio, seed,
          logging_steps, model_config, bf16, tuned=False, callbacks=(), **unused) -> Trainer:
    set_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    labels = splits["train"].features["label"].names
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)}, **model_config)
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.05,
                                             target_modules=["query", "value"]))

    def tokenize(batch):
        return tokenizer(batch["text"], truncation=True, max_length=max_length)

    train = splits["train"].map(tokenize, batched=True, remove_columns=["text"])
    args = TrainingArguments(output_dir=output_dir, per_device_train_batch_size=batch_size, learning_rate=lr,
                             num_train_epochs=epochs, max_steps=max_steps,
                             warmup_steps=warmup_ratio,  # below 1: a fraction of the steps
                             lr_scheduler_type="linear", seed=seed, logging_steps=logging_steps,
                             bf16=bf16, use_cpu=not torch.cuda.is_available(), save_strategy="no", report_to=[],
                             **(TUNED if tuned else {}))
    collator = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8 if tuned else None)
    return Trainer(model=model, args=args, train_dataset=train, data_collator=collator, callbacks=list(callbacks))

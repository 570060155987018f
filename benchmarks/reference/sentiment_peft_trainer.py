"""The reference for the sentiment benchmark: LoRA on MiniLM-L6 for Rotten Tomatoes,
written the way it is done today with Hugging Face peft and a plain transformers
Trainer (the pattern of the transformers and peft docs), without peftkit.

`peftkit bench train benchmarks/train-sentiment.yaml` calls build() with the
recipe's data and hyperparameters and times trainer.train(). The LoRA settings are
those of peftkit's `lora` preset (r=8, alpha 16, dropout 0.05, query/value), so
both train the same parameters.
"""
import torch
from peft import LoraConfig, get_peft_model
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                          TrainingArguments, set_seed)


def build(model_dir, splits, output_dir, *, lr, batch_size, epochs, max_steps, max_length, warmup_ratio, seed,
          logging_steps, model_config, callbacks=(), **unused) -> Trainer:
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
                             bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
                             save_strategy="no", report_to=[])
    return Trainer(model=model, args=args, train_dataset=train, data_collator=DataCollatorWithPadding(tokenizer),
                   callbacks=list(callbacks))

"""The reference for the headline benchmark: LoRA on SmolLM2-135M-Instruct writing BBC
headlines, written the way it is done today with Hugging Face peft and a plain
transformers Trainer (chat template, loss on the answer only), without peftkit.

`peftkit bench train benchmarks/train-headlines.yaml` calls build() with the
recipe's data and hyperparameters and times trainer.train(). The LoRA settings are
those of peftkit's `lora` preset (r=8, alpha 16, dropout 0.05, q/v projections).

`tuned=True` is the `reference-tuned` variant: what a user who knows Trainer sets on top,
from the transformers performance guides, keeping the model and data as they are:
length-grouped batches, padding to a multiple of 8, bf16 autocast (the driver passes
bf16=True where the hardware computes bf16 natively: a bf16 GPU, or a CPU with
AVX512-BF16 or AMX) and the fused AdamW kernel.
"""
import torch
from peft import LoraConfig, get_peft_model
from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments,
                          set_seed)

TUNED = {"train_sampling_strategy": "group_by_length", "optim": "adamw_torch_fused"}


def build(model_dir, splits, output_dir, *, instruction, lr, batch_size, epochs, max_steps, max_length,
          warmup_ratio, seed, logging_steps, model_config, bf16, tuned=False, torch_compile=False, callbacks=(),
          **unused) -> Trainer:
    set_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"  # for training
    model = AutoModelForCausalLM.from_pretrained(model_dir, pad_token_id=tokenizer.pad_token_id, **model_config)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.05,
                                             target_modules=["q_proj", "v_proj"]))

    def chat(article: str) -> list[int]:
        text = tokenizer.apply_chat_template([{"role": "user", "content": f"{instruction}\n\n{article}"}],
                                             add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    overhead = len(chat(""))

    def encode(row):
        answer = tokenizer(row["headline"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        article = tokenizer(row["article"], add_special_tokens=False)["input_ids"][:max_length - overhead - len(answer)]
        prompt = chat(tokenizer.decode(article))
        ids = (prompt + answer)[:max_length]
        return {"input_ids": ids, "attention_mask": [1] * len(ids),
                "labels": ([-100] * len(prompt) + answer)[:max_length]}

    train = splits["train"].map(encode, remove_columns=splits["train"].column_names)
    args = TrainingArguments(output_dir=output_dir, per_device_train_batch_size=batch_size, learning_rate=lr,
                             num_train_epochs=epochs, max_steps=max_steps,
                             warmup_steps=warmup_ratio,  # below 1: a fraction of the steps
                             lr_scheduler_type="linear", seed=seed, logging_steps=logging_steps,
                             bf16=bf16, use_cpu=not torch.cuda.is_available(), save_strategy="no", report_to=[],
                             torch_compile=torch_compile,  # the `reference-compiled` variant: Trainer compiles the model
                             **(TUNED if tuned else {}))
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, pad_to_multiple_of=8 if tuned else None)
    return Trainer(model=model, args=args, train_dataset=train, data_collator=collator, callbacks=list(callbacks))

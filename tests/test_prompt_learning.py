"""peft's prompt learning through attach (prompt_tuning, p_tuning): the task models it works on, the ones
refused in one line, the position limit, 4-bit bases and gradient checkpointing."""
import pytest
import torch
from conftest import make_tiny, tiny_inputs

import peftkit
from peftkit import PeftkitError
from peftkit.recipe import load_recipe
from peftkit.train import set_up

PROMPT_METHODS = ["prompt_tuning", "p_tuning"]


def one_step(model, inputs):
    """The trainable parameters' gradients after one backward pass of a squared-logits loss."""
    model.train()
    model.zero_grad()
    model(**inputs).logits.float().pow(2).mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_a_misspelt_option_names_the_nearest_valid_ones():
    with pytest.raises(PeftkitError, match="unknown prompt_tuning option 'num_virtual_token'; did you mean "
                                           "num_virtual_tokens.* PromptTuningConfig accepts: .*prompt_tuning_init"):
        peftkit.attach(make_tiny("llama", "lm"), {"method": "prompt_tuning", "num_virtual_token": 8})
    with pytest.raises(PeftkitError, match="unknown p_tuning option 'encoder_hiden_size'; did you mean "
                                           "encoder_hidden_size"):
        peftkit.attach(make_tiny("llama", "lm"), {"method": "p_tuning", "encoder_hiden_size": 8})
    # peft reads the embedding width from the model: a user's value would build prompts the model cannot take
    with pytest.raises(PeftkitError, match="unknown p_tuning option 'token_dim'"):
        peftkit.attach(make_tiny("llama", "lm"), {"method": "p_tuning", "token_dim": 8})
    with pytest.raises(PeftkitError, match="prompt_tuning num_virtual_tokens must be a positive integer, got 0"):
        peftkit.attach(make_tiny("llama", "lm"), {"method": "prompt_tuning", "num_virtual_tokens": 0})


@pytest.mark.parametrize("name", PROMPT_METHODS)
def test_options_pass_through_to_peft(name):
    extra = {"prompt_tuning": {"prompt_tuning_init": "SAMPLE_VOCAB"}, "p_tuning": {"encoder_hidden_size": 24}}[name]
    model = peftkit.attach(make_tiny("llama", "lm"), {"method": name, "num_virtual_tokens": 5, **extra})
    config = model.peft_config["default"]
    assert config.num_virtual_tokens == 5 and all(getattr(config, k) == v for k, v in extra.items())
    assert model(**tiny_inputs()).logits.shape[1] == 5 + 10  # the prompt's positions come first


@pytest.mark.parametrize("name", PROMPT_METHODS)
@pytest.mark.parametrize("arch, task, problem", [
    ("bert", "qa", "BertForQuestionAnswering: peft prepends the prompt to the start/end logits but not to the "
                   "answer positions"),
    ("llama", "qa", "LlamaForQuestionAnswering: peft prepends the prompt to the start/end logits"),
    ("llama", "cls", "LlamaForSequenceClassification: given embeddings .* reads its label at the last position"),
    ("gpt2", "cls", "GPT2ForSequenceClassification: given embeddings"),
    ("bert", "base", "BertModel: peft adds the prompt only in a task model's forward"),
])
def test_a_task_model_peft_prompts_wrongly_is_refused_in_one_line(name, arch, task, problem):
    model = make_tiny(arch, task)
    with pytest.raises(PeftkitError, match=f"{name} does not work on a {problem}.*; it works on causal LMs "
                                           r"\(generation\) and encoder sequence classifiers \(BERT, RoBERTa\)$"):
        peftkit.attach(model, name)
    assert not hasattr(model, "peftkit_adapters")
    assert all(p.requires_grad for p in model.parameters()), "refused, yet the model was frozen"


def test_a_decoder_classifier_under_peft_prompts_reads_a_pad_token():
    """Why LlamaForSequenceClassification is refused: under stock peft a right-padded row's label
    comes from a pad position, so padding changes the prediction."""
    from peft import PromptTuningConfig, get_peft_model

    model = get_peft_model(make_tiny("llama", "cls"), PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4))
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(0))
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], dim=1)  # pad_token_id 0
    mask = torch.cat([torch.ones(1, 6, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long)], dim=1)
    with torch.no_grad():
        alone = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        in_a_batch = model(input_ids=padded, attention_mask=mask).logits
    assert not torch.allclose(alone, in_a_batch, atol=1e-4)


def test_a_prompt_longer_than_the_position_table_is_refused_at_attach():
    model = make_tiny("bert", "cls")  # max_position_embeddings 64
    with pytest.raises(PeftkitError, match=r"prompt_tuning: 64 virtual tokens and one input token need 65 positions, "
                                           r"more than the 64 of BertForSequenceClassification "
                                           r"\(max_position_embeddings\); use num_virtual_tokens <= 63$"):
        peftkit.attach(model, {"method": "prompt_tuning", "num_virtual_tokens": 64})
    assert not hasattr(model, "peftkit_adapters")
    fits = peftkit.attach(make_tiny("bert", "cls"), {"method": "prompt_tuning", "num_virtual_tokens": 63})
    assert fits(input_ids=torch.tensor([[5]])).logits.shape == (1, 3)


def test_a_recipe_whose_inputs_and_prompt_pass_the_position_limit_is_refused_before_training(tmp_path):
    # MiniLM-L6 has 512 positions: 20 virtual tokens leave room for inputs of 492 tokens
    overrides = ["method=p_tuning", "data.max_train_samples=8", "data.max_eval_samples=8", f"output_dir={tmp_path}"]
    with pytest.raises(PeftkitError, match=r"p_tuning: 20 virtual tokens and train.max_length 500 need 520 "
                                           r"positions, more than the 512 of BertForSequenceClassification "
                                           r"\(max_position_embeddings\); use num_virtual_tokens <= 12 or "
                                           r"train.max_length <= 492$"):
        set_up(load_recipe("sentiment-lora", overrides + ["train.max_length=500"]))
    assert set_up(load_recipe("sentiment-lora", overrides + ["train.max_length=492"])).steps > 0


@pytest.mark.parametrize("name", PROMPT_METHODS)
def test_gradient_checkpointing_trains_the_prompt_as_without_it(name):
    inputs = tiny_inputs()
    plain = one_step(peftkit.attach(make_tiny("llama", "lm"), name), inputs)
    model = peftkit.attach(make_tiny("llama", "lm"), name, gradient_checkpointing=True)  # the same prompt init
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    checkpointed = one_step(model, inputs)
    assert plain.keys() == checkpointed.keys() and plain
    for key, grad in plain.items():
        torch.testing.assert_close(checkpointed[key], grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", PROMPT_METHODS)
def test_prompt_learning_trains_saves_and_loads_on_a_4bit_base(tmp_path, name):
    make_tiny("llama", "lm").save_pretrained(tmp_path / "base")
    model = peftkit.attach(peftkit.load_model(tmp_path / "base", task="causal-lm", quantize="nf4"), name)
    inputs = tiny_inputs()
    with torch.no_grad():
        before = model(**inputs).logits
    prompt = {k: v.clone() for k, v in model.named_parameters() if v.requires_grad}
    model.train()
    model(**inputs).logits.float().pow(2).mean().backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
    model.eval()
    assert all(not torch.equal(v, prompt[k]) for k, v in model.named_parameters() if k in prompt and "embedding" in k)
    with torch.no_grad():
        after = model(**inputs).logits
    assert not torch.allclose(after, before)
    peftkit.save_adapter(model, tmp_path / name)
    loaded = peftkit.load_adapter(peftkit.load_model(tmp_path / "base", task="causal-lm", quantize="nf4"),
                                  tmp_path / name)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, after, rtol=0, atol=1e-6)

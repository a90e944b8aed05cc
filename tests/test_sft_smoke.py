"""TRL SFTTrainer with assistant-only loss runs on our chat template (CPU, fp32)."""

import torch
from datasets import Dataset
from transformers import Qwen2ForCausalLM
from trl import SFTConfig, SFTTrainer

from steiner.format import Decision, Step, Trace, render


def test_sft_trainer_assistant_only_loss_runs_two_steps(tiny_tokenizer, tiny_model_dir, tmp_path):
    torch.manual_seed(0)
    model = Qwen2ForCausalLM.from_pretrained(tiny_model_dir)  # built from config in conftest
    trace = Trace([Step("a", "7-3=4", "4 25 50", "ok")], [Decision.END], "(50+25)+(7-3)")
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Reach {79 + i}."},
                {"role": "assistant", "content": render(trace)},
            ]
        }
        for i in range(8)
    ]
    args = SFTConfig(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=4,
        assistant_only_loss=True,
        max_length=256,
        use_cpu=True,
        bf16=False,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        activation_checkpointing=False,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tiny_tokenizer,
    )
    batch = next(iter(trainer.get_train_dataloader()))
    labels = batch["labels"][0]
    trained = tiny_tokenizer.decode(batch["input_ids"][0][labels != -100])
    assert trained.startswith("<|reasoning_start|>") and "user" not in trained
    result = trainer.train()
    assert trainer.state.global_step == 2
    assert result.training_loss > 0

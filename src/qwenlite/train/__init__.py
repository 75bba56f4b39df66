"""Training on the same model code that serves: tokenizer training, data preparation, pretraining, supervised
fine-tuning, LoRA and preference tuning; distributed launch under torchrun.

Modules: `tokenizer_train` (byte-level BPE with Qwen3.5's pre-tokenizer and special tokens), `data` (text,
JSONL, Parquet -> token cache -> packed sequences -> resumable batches), `common` (the learning-rate schedule, the
optimizer, the SFT / DPO step loop), `pretrain` (TrainConfig and the pretraining loop), `posttrain` (what SFT and
DPO share: data reading, log-probabilities, loading and saving), `sft`, `dpo`, `lora` (PEFT-format adapters),
`distributed` (process group, DDP / FSDP2), `plots` (loss curve PNG), `demo` (the CPU recipe). The command line
is cli/train.py."""

"""Training on the same model code that serves: tokenizer training, data preparation, pretraining, and (in
their own modules) supervised fine-tuning, LoRA and preference tuning; distributed launch under torchrun.

Modules: `tokenizer_train` (byte-level BPE with Qwen3.5's pre-tokenizer and special tokens), `data` (text,
JSONL, Parquet -> token cache -> packed sequences -> resumable batches), `pretrain` (TrainConfig and the one
training loop), `distributed` (process group, DDP / FSDP2), `plots` (loss curve PNG), `demo` (the CPU recipe),
`cli` (`qwenlite train ...`)."""

# Fine-tune the released FLM-Audio 7B on one GPU with LoRA adapters (lora.py), on a dataset in
# moshi-finetune's format (stereo wavs with `alignments` JSON beside them; see the README):
#   python data.py prepare --manifest my.jsonl --out prepared --tokenizer FLM-Audio/ \
#       --codec FLM-Audio/tokenizer-e351c8d8-checkpoint125.safetensors
#   python train.py config/finetune_flm_lora.py --init_path=FLM-Audio/ --data_dir=prepared --out_dir=out/lora
# The base stays frozen in bf16; rank-16 adapters on every backbone and DepthGPT projection train
# (44M of 8.3B parameters). Estimated 28 GB on one GPU for 2-minute windows (python sizing.py
# --world 1 --lora_rank 16). Checkpoints hold the adapters alone (a few hundred MB):
#   python chat.py --checkpoint out/lora/latest          # base + adapters, merged on load
#   python lora.py merge out/lora/latest out/lora/merged # the official layout, for any server
init_from = "flm"
init_path = "FLM-Audio"
lora_rank = 16
lora_alpha = 16.0
lora_targets = ["attn", "mlp", "depth"]
lora_full = []                 # add "depth_gpt" to train it fully when the voice itself must change
parallel = "fsdp"              # FSDP2 in one process: bf16 compute; also shards over more GPUs under torchrun
dtype = "bfloat16"
activation_checkpointing = True
batch_size = 1
grad_accum = 16
window_frames = 1500
stages = [
    # SFT on your dialogs with the monologue leading; adapters take larger steps than full SFT
    dict(name="sft", steps=2000, lr=2e-4, min_lr=2e-5, warmup=50,
         mix=[dict(task="dialog", placement="lead")]),
]
eval_interval = 250
ckpt_interval = 250
keep_last = 3
verify_data = False

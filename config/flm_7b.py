# The paper's pipeline at full size: Qwen2.5-7B -> post-training in stages whose monologue
# alternately trails (ASR-like) and leads (TTS-like) the audio -> SFT on semi-duplex dialogs ->
# SFT on full-duplex dialogs, monologue leading (the plan config/tiny_demo.py follows in miniature). FSDP2 with bf16 mixed precision and per-layer activation checkpointing; sized for
# nodes of 8 x 80 GB GPUs:
#   torchrun --nproc_per_node=8 train.py config/flm_7b.py --init_path=/models/Qwen2.5-7B \
#       --data_dir=/data/prepared --out_dir=/ckpt/flm7b
# Prepare the data with the model's tokenizer (python data.py prepare ... --tokenizer
# /models/Qwen2.5-7B --codec tokenizer-e351c8d8-checkpoint125.safetensors) and tag each manifest
# line with a "kind": "speech" (single-speaker ASR/TTS corpora), "dialog" (turn-taking
# dialogs), "duplex" (overlaps, interruptions, backchannels). Step counts and batch sizes are
# placeholders to scale with your data; the shape (stages, placements, weights) is the point.
init_from = "qwen"
init_path = "Qwen2.5-7B"
model_args = dict(text_wait_token_id=151665)   # first free id after Qwen2.5's 151665 tokens
parallel = "fsdp"
dtype = "bfloat16"
activation_checkpointing = True
compile = True
batch_size = 2               # per GPU
grad_accum = 32              # over all GPUs: 2 x 32 = 64 windows of 2 minutes per step (one 8-GPU node: 4 each)
window_frames = 1500         # 2 minutes at 12.5 Hz
weight_decay = 0.1
beta2 = 0.95
grad_clip = 1.0
wait_weight = 0.5
semantic_weight = 1.0
stages = [
    # post-training, the monologue's position alternating between stages (the paper's dual training):
    # trail -- hear speech, then write it (ASR-like; both speakers' voices, dialogs too)
    dict(name="post-trail-1", steps=5000, lr=2e-5, min_lr=1e-5, warmup=500, placement="trail",
         mix=[dict(task="asr", kind="speech", weight=2.0),
              dict(task=dict(monologue="assistant", speak=None, listen="assistant", audio_weight=0.0),
                   kind="speech", weight=1.0),
              dict(task="dialog", kind="dialog", weight=1.0)]),
    # lead -- write a sentence, then say it (TTS-like), and dialogs with the monologue leading
    dict(name="post-lead-1", steps=5000, lr=1e-5, min_lr=5e-6, warmup=100, placement="lead",
         mix=[dict(task="tts", kind="speech", weight=2.0), dict(task="dialog", kind="dialog", weight=1.0)]),
    # the same two placements again, at a lower learning rate
    dict(name="post-trail-2", steps=5000, lr=1e-5, min_lr=5e-6, warmup=100, placement="trail",
         mix=[dict(task="asr", kind="speech", weight=2.0), dict(task="dialog", kind="dialog", weight=1.0)]),
    # ... and the last post-training stage leads, as SFT will
    dict(name="post-lead-2", steps=5000, lr=1e-5, min_lr=2e-6, warmup=100, placement="lead",
         mix=[dict(task="tts", kind="speech", weight=2.0), dict(task="dialog", kind="dialog", weight=1.0)]),
    # SFT on turn-taking (semi-duplex) dialogs: think the answer, then say it, while listening
    dict(name="sft-semi-duplex", steps=4000, lr=1e-5, min_lr=1e-6, warmup=100, placement="lead",
         mix=[dict(task="dialog", kind="dialog")]),
    # SFT with full-duplex events: pauses, backchannels, interruptions
    dict(name="sft-full-duplex", steps=4000, lr=5e-6, min_lr=5e-7, warmup=100, placement="lead",
         mix=[dict(task="dialog", kind="duplex", weight=3.0), dict(task="dialog", kind="dialog", weight=1.0)]),
]
log_interval = 10
eval_interval = 1000
eval_batches = 8
eval_decode = 16
eval_tasks = ["dialog", "asr", "tts"]
ckpt_interval = 1000
keep_last = 3
verify_data = False          # CRC-checking terabytes of shards at every start is slow

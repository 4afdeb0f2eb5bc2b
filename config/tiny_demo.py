# The default preset: `python train.py` with no arguments.
# The tiny model (~19M parameters) on the embedded espeak-ng corpus, on 2 CPU cores: the paper's
# pipeline shape in miniature -- post-training on ASR-style and TTS-style tasks (the two monologue
# placements), then supervised fine-tuning on full-duplex dialogs with the monologue leading.
# If data_dir holds no prepared data, train.py synthesises and prepares the demo corpus first.
out_dir = "out/tiny_demo"
data_dir = "data_demo/prepared"
init_from = "scratch"
model = "tiny"
threads = 1                  # one intra-op thread: on 2 shared cores, 2 threads stall whenever another
                             # process takes a core (measured 0.4 s -> 20 s per step); 1 thread: ~0.9 s
batch_size = 8
grad_accum = 1
window_frames = 128          # 10.2 s; whole dialogs are up to 18 s, windows start anywhere
warmup = 20
stages = [
    # post-training: hear speech, write its words after it (trail, ASR-style) -- on both voices --
    # and write a sentence, then say it (lead, TTS-style) in the assistant's voice
    dict(name="post-train", steps=300, lr=2e-3, min_lr=4e-4,
         mix=[dict(task="asr", weight=1.0),
              dict(task=dict(monologue="assistant", speak=None, listen="assistant", placement="trail",
                             audio_weight=0.0), weight=0.5),
              dict(task="tts", weight=1.0)]),
    # SFT: dialogs, the assistant thinks (leading monologue) and speaks while hearing the user
    dict(name="sft", steps=300, lr=1e-3, min_lr=1e-4, warmup=10,
         mix=[dict(task="dialog", kind="dialog", placement="lead")]),
]
log_interval = 10
eval_interval = 300          # after post-training, and at the end
eval_batches = 2
eval_decode = 16
ckpt_interval = 100
keep_last = 2

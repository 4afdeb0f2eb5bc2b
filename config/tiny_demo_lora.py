# The quickstart's SFT with LoRA adapters instead of full fine-tuning, layered on config/tiny_demo.py,
# over a base that has learnt to speak (the quickstart's post-training, its first 1,100 steps):
#   python train.py --max_steps=1100 --out_dir=out/tiny_demo_base
#   python train.py config/tiny_demo.py config/tiny_demo_lora.py
# The base stays frozen; rank-16 adapters on the backbone's projections train (0.36M numbers, 4.9%
# of the 7.4M weights). Held-out answers, measured on 2 cores against full SFT from the same base
# (the quickstart's plan, before silence_keep): monologue right in the spoken run 39/73 (full 44/73),
# spoken right 8/73 (full 36/73), of those thought right 6/39 (full 33/44). The adapters learn what
# to say, not to say it: DepthGPT, frozen, voices what the adapted backbone feeds it poorly.
# Over the quickstart's hear stage alone (a base that never spoke), adapters on every backbone and
# DepthGPT projection (9.6%) spoke 0/37 held-out answers (full SFT 13/37), with DepthGPT trained
# fully 1/37.
out_dir = "out/tiny_demo_lora"
init_from = "flm"
init_path = "out/tiny_demo_base/latest"
lora_rank = 16
lora_alpha = 16.0
lora_targets = ["attn", "mlp"]
lora_full = []
eval_spoken = 80             # all 73 held-out answers, as the figures above
stages = [
    # SFT on turn-taking dialogs, as the quickstart's; adapters take ~6x full SFT's steps (2.5x spoke 4/73)
    dict(name="sft-dialog", steps=1000, lr=5e-3, min_lr=1.25e-3, warmup=10, placement="lead",
         mix=[dict(task=dict(heard="word-trail"), kind="dialog", weight=2.0),
              dict(task=dict(heard="word-trail"), kind="duplex"),
              dict(task="asr", placement="word-trail", weight=0.5)]),
    # SFT with full-duplex events, as the quickstart's
    dict(name="sft-duplex", steps=200, lr=1.25e-3, min_lr=3e-4, warmup=5, placement="lead",
         mix=[dict(task=dict(heard="word-trail"), kind="duplex", weight=2.0),
              dict(task=dict(heard="word-trail"), kind="dialog")]),
]

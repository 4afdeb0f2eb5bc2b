# The quickstart's SFT with LoRA adapters instead of full fine-tuning, layered on config/tiny_demo.py,
# over a base that has learnt to speak (the quickstart's post-training, its first 1,100 steps):
#   python train.py --max_steps=1100 --out_dir=out/tiny_demo_base
#   python train.py config/tiny_demo.py config/tiny_demo_lora.py
# The base stays frozen; rank-8 adapters on the backbone's and DepthGPT's projections train (0.36M
# numbers, 4.9% of the 7.4M weights). Held-out answers on 2 cores (python train.py config/tiny_demo.py
# config/tiny_demo_lora.py): spoken right 13/73 (full SFT, the quickstart: 35/73), monologue right
# in that run 30/73 (full 47/73), of those spoken right 11/30 (full 32/47). Rank-16 adapters on the
# backbone alone (4.9% too; base and full SFT before silence_keep, full SFT 36/73) spoke 8/73 and
# thought 39/73, of those spoken right 6/39: they learn what to say, not to say it; DepthGPT,
# frozen, voices what the adapted backbone feeds it poorly. Over the hear stage alone (a base that
# never spoke), adapters everywhere at rank 16 (9.6%) spoke 0/37 (full SFT 13/37).
out_dir = "out/tiny_demo_lora"
init_from = "flm"
init_path = "out/tiny_demo_base/latest"
lora_rank = 8
lora_alpha = 8.0
lora_targets = ["attn", "mlp", "depth"]
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

# The quickstart's SFT with LoRA adapters instead of full fine-tuning, over its post-trained model,
# layered on config/tiny_demo.py:
#   python train.py --max_steps=500 --out_dir=out/tiny_demo_hear          # the quickstart's hear stage
#   python train.py config/tiny_demo.py config/tiny_demo_lora.py          # its two SFT stages, LoRA
# The base stays frozen; rank-16 adapters on every backbone and DepthGPT projection train (0.71M
# numbers, 9.6% of the 7.4M weights). Measured on 2 cores: held-out monologue answers 14/24 (the
# quickstart's full SFT: 18/24), spoken answers 0/37 (13/37): its DepthGPT never learned to speak
# in the hear stage, and rank-16 adapters over it do not learn a voice (audio loss stays ~2.3).
# With lora_targets=["attn", "mlp"], lora_full=["depth_gpt"] (40% of the weights): 12/24 and 1/37.
out_dir = "out/tiny_demo_lora"
init_from = "flm"
init_path = "out/tiny_demo_hear/latest"
lora_rank = 16
lora_alpha = 16.0
lora_targets = ["attn", "mlp", "depth"]
lora_full = []
stages = [
    # SFT on turn-taking dialogs, as the quickstart's; adapters take larger steps than full SFT
    dict(name="sft-dialog", steps=1000, lr=2e-3, min_lr=5e-4, warmup=10, placement="lead",
         mix=[dict(task=dict(heard="word-trail"), kind="dialog", weight=2.0),
              dict(task=dict(heard="word-trail"), kind="duplex"),
              dict(task="asr", placement="word-trail", weight=0.5)]),
    # SFT with full-duplex events, as the quickstart's
    dict(name="sft-duplex", steps=200, lr=5e-4, min_lr=1.25e-4, warmup=5, placement="lead",
         mix=[dict(task=dict(heard="word-trail"), kind="duplex", weight=2.0),
              dict(task=dict(heard="word-trail"), kind="dialog")]),
]

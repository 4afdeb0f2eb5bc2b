# The quickstart with a post-training that also speaks, as the paper's (hearing with the monologue
# trailing, then speaking with it leading), and 2,300 steps; layered on config/tiny_demo.py:
#   python train.py config/tiny_demo.py config/tiny_demo_post.py     # 17 min on 2 cores, from nothing
# It spoke 36/73 held-out answers right on data_demo/prepared and 36/73 on a freshly synthesised
# corpus (the quickstart: 23/73); monologue right 44/73 and 49/73, of those spoken right 33/44
# and 31/49 (the quickstart: 42/73, 20/42): speaking improves. It does not fit the quickstart's 15
# minutes (synthesis 1 min, steps 13.5-14.5 min, evaluation 1.5 min); fitted in, it lost more than
# the speaking stage gave, each on a fresh corpus: 450 + 550 + 900 + 200 steps spoke 20/73,
# 400 + 500 + 1,100 17/73, 500 + 500 + 1,050 8/37. With bf16 autocast (--dtype=bfloat16) 27/73
# and 24/73, and its steps were no faster. DepthGPT trained on a random half of the speaking
# columns (steps 23% faster, 11.3 min) spoke 16/73 (monologue 40/73): speech needs every column.
# Its first 1,100 steps (--max_steps=1100) are the base config/tiny_demo_lora.py adapts.
out_dir = "out/tiny_demo_post"
eval_spoken = 80
stages = [
    # hear speech (every user voice), write each word just after it is heard: the quickstart's
    dict(name="hear", steps=500, lr=1e-3, min_lr=5e-4, placement="word-trail", mix=[dict(task="asr")]),
    # speak the assistant's sentences from its monologue, and keep hearing
    dict(name="speak", steps=600, lr=8e-4, min_lr=2e-4, warmup=10, placement="lead",
         mix=[dict(task="tts", kind="dialog", weight=2.0), dict(task="asr", placement="word-trail")]),
    # SFT on turn-taking dialogs and then full-duplex events, as the quickstart's
    dict(name="sft-dialog", steps=1000, lr=8e-4, min_lr=2e-4, warmup=10, placement="lead",
         mix=[dict(task=dict(heard="word-trail"), kind="dialog", weight=2.0),
              dict(task=dict(heard="word-trail"), kind="duplex"),
              dict(task="asr", placement="word-trail", weight=0.5)]),
    # keep quiet through pauses and backchannels, yield to barge-ins
    dict(name="sft-duplex", steps=200, lr=2e-4, min_lr=5e-5, warmup=5, placement="lead",
         mix=[dict(task=dict(heard="word-trail"), kind="duplex", weight=2.0),
              dict(task=dict(heard="word-trail"), kind="dialog")]),
]

# The default preset: `python train.py` with no arguments (about 14 min on 2 idle CPU cores, AMD
# EPYC, the corpus's synthesis included).
# The tiny model (7.4M parameters: its audio vocabulary is the demo codec's 64 codes + 2) on the
# demo corpus (demo/corpus.py: many espeak voices, a held-out voice and held-out items),
# synthesised and prepared into data_dir if it is missing.
# The plan is the paper's in miniature: post-training that hears (monologue trailing the audio)
# and then speaks (monologue leading), then SFT on turn-taking dialogs, then SFT with full-duplex
# events, the monologue leading. Choices measured on this corpus (see the README's results):
#  - the listening stage places each heard word right after its audio (word-trail), which
#    learned ~4x faster than whole sentences (ASR CER 0.17 after 400 steps on one voice vs 0.48);
#  - in SFT the monologue also writes what the user said, word-trail, before its own answer
#    (`heard`): answering becomes text -> text, which a small model learns in minutes, where
#    recalling words from audio seconds later it did not (0/30 answers vs 6/30 after 800 steps);
#  - the demo codec has 64 entries per codebook (demo_codec_codes): learning to speak alone for 1,000
#    steps, answers spoken from its own teacher-forced codes were recognised 14/25 with 64 codes,
#    8/25 with 256 and 1/25 with Mimi's 2048, while the recorded answers stay 24/25 at every size;
#  - the semantic codebook's loss weighs x20 (moshi-finetune weighs it x100): 400 more SFT steps
#    from the long run spoke 26/73 held-out answers right with x1, 32/73 with x20, 28/73 with x100;
#  - it reads its own voice back with 15% of the codes random (audio_noise): speaking freely it
#    reads its own codes, not the recording's, and its slips compound. At 1,700 steps: 12/37 held-out
#    answers spoken right without, 18/37 with 0.15, 12/37 with 0.3;
#  - the speaking stage: without it (500 hear + 1,200 SFT) 23/73 held-out answers were spoken
#    right, with it (2,300 steps) 36/73 twice, but in 17 minutes; cut to fit 15 minutes, less
#    than without (450 + 550 + 900 + 200: 20/73). Speech needs its columns: DepthGPT on a random
#    half of them spoke 16/73;
#  - DepthGPT trains on a quarter of the silent columns (silence_keep, grid.thin_silence): two
#    thirds of the speak columns were silence; SFT steps 0.45 -> 0.31 s and the 2,300 steps fit.
out_dir = "out/tiny_demo"
data_dir = "data_demo/prepared"
demo_codec_codes = 64        # not Mimi's 2048: see above
demo_corpus = dict(n_dialogs=1200, n_duplex=600, n_utterances=1200, n_val=80, n_words=0)
init_from = "scratch"
model = "tiny"
threads = 0                  # torch's default: every core (on 2 cores busy with another job, pass
                             # --threads=1, or both stall whenever the other takes a core)
batch_size = 10
grad_accum = 1
window_frames = 96           # 7.7 s windows, anchored at sentence starts
warmup = 20
semantic_weight = 20.0        # the semantic codebook's loss x20 where the model speaks: see above
audio_noise = 0.15           # its own audio codes read back 15% random: see above
silence_keep = 0.25          # DepthGPT trains on a quarter of the silent speak columns: see above
stages = [
    # post-training: hear speech (every user voice), write each word just after it is heard
    dict(name="hear", steps=500, lr=1e-3, min_lr=5e-4, placement="word-trail", mix=[dict(task="asr")]),
    # post-training: speak the assistant's sentences from its monologue (leading), and keep hearing
    dict(name="speak", steps=600, lr=8e-4, min_lr=2e-4, warmup=10, placement="lead",
         mix=[dict(task="tts", kind="dialog", weight=2.0), dict(task="asr", placement="word-trail")]),
    # SFT on turn-taking dialogs: write what was heard, then think the answer (lead) and say it
    dict(name="sft-dialog", steps=1200, lr=8e-4, min_lr=2e-4, warmup=10, placement="lead",
         mix=[dict(task=dict(heard="word-trail"), kind="dialog", weight=2.0),
              dict(task=dict(heard="word-trail"), kind="duplex"),
              dict(task="asr", placement="word-trail", weight=0.5)]),
    # SFT with full-duplex events: keep quiet through pauses and backchannels, yield to barge-ins
    dict(name="sft-duplex", steps=200, lr=2e-4, min_lr=5e-5, warmup=5, placement="lead",
         mix=[dict(task=dict(heard="word-trail"), kind="duplex", weight=2.0),
              dict(task=dict(heard="word-trail"), kind="dialog")]),
]
log_interval = 25
eval_interval = 100_000      # at the end only (each costs ~30 s of the 15 min)
eval_batches = 2
eval_decode = 24
eval_spoken = 40             # held-out recordings streamed and judged from the audio at the end
ckpt_interval = 100
keep_last = 2

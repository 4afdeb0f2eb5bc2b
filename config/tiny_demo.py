# The default preset: `python train.py` with no arguments (11 min 47 s on 2 idle CPU cores, AMD
# EPYC, the corpus's synthesis included).
# The tiny model (7.4M parameters: its audio vocabulary is the demo codec's 64 codes + 2) on the
# demo corpus (demo/corpus.py: many espeak voices, a held-out voice and held-out items),
# synthesised and prepared into data_dir if it is missing.
# The plan is the paper's in miniature: post-training with the monologue trailing the audio, then
# SFT on turn-taking dialogs, then SFT with full-duplex events, the monologue leading. Choices
# measured on this corpus (see the README's results):
#  - the listening stage places each heard word right after its audio (word-trail), which
#    learned ~4x faster than whole sentences (ASR CER 0.17 after 400 steps on one voice vs 0.48);
#  - in SFT the monologue also writes what the user said, word-trail, before its own answer
#    (`heard`): answering becomes text -> text, which a small model learns in minutes, where
#    recalling words from audio seconds later it did not (0/30 answers vs 6/30 after 800 steps);
#  - the demo codec has 64 entries per codebook (demo_codec_codes): learning to speak alone for 1,000
#    steps, answers spoken from its own teacher-forced codes were recognised 14/25 with 64 codes,
#    8/25 with 256 and 1/25 with Mimi's 2048, while the recorded answers stay 24/25 at every size;
#    the long run's held-out spoken answers went from 3/73 (2048) to 26/73 (64).
#  - the semantic codebook's loss weighs x20 (moshi-finetune weighs it x100). 400 more SFT steps
#    from the long run's x1 checkpoint spoke 26/73 held-out answers right with x1, 32/73 with x20,
#    28/73 with x100; the whole long run spoke 27/73 with x20, 26/73 with x1: no clear gain, but
#    barge-in stops 0.48 -> 0.25 s and voice CER 0.12 -> 0.10; the README's figures are with x20.
#  - steps: 500 hear + 1,200 SFT. On 2 idle cores a step takes 0.21 s (hear) or 0.39 s (SFT), so
#    1,700 steps fit the 15 minutes; 925 steps (300 + 625) spoke 1/37 held-out answers right, 1,700
#    (no audio noise) 12/37. A TTS stage instead of hear steps, or a doubled learning rate, was worse.
#  - it reads its own voice back with 15% of the codes random (audio_noise): speaking freely it
#    reads its own codes, not the recording's, and its slips compound. At 1,700 steps: 12/37 held-out
#    answers spoken right without, 18/37 with 0.15 (13/37 timed on a fresh corpus), 12/37 with 0.3.
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
stages = [
    # post-training: hear speech (every user voice), write each word just after it is heard
    dict(name="hear", steps=500, lr=1e-3, min_lr=5e-4, placement="word-trail", mix=[dict(task="asr")]),
    # SFT on turn-taking dialogs: write what was heard, then think the answer (lead) and say it
    dict(name="sft-dialog", steps=1000, lr=8e-4, min_lr=2e-4, warmup=10, placement="lead",
         mix=[dict(task=dict(heard="word-trail"), kind="dialog", weight=2.0),
              dict(task=dict(heard="word-trail"), kind="duplex"),
              dict(task="asr", placement="word-trail", weight=0.5)]),
    # SFT with full-duplex events: keep quiet through pauses and backchannels, yield to barge-ins
    dict(name="sft-duplex", steps=200, lr=2e-4, min_lr=5e-5, warmup=5, placement="lead",
         mix=[dict(task=dict(heard="word-trail"), kind="duplex", weight=2.0),
              dict(task=dict(heard="word-trail"), kind="dialog")]),
]
log_interval = 25
eval_interval = 1000         # at the end only (each costs ~30 s of the 15 min)
eval_batches = 2
eval_decode = 24
eval_spoken = 40             # held-out recordings streamed and judged from the audio at the end
ckpt_interval = 100
keep_last = 2

# The default preset: `python train.py` with no arguments (23 min measured on 2 CPU cores shared
# with another job; about 14 min estimated on 2 idle cores from its step times).
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
#  - the steps go to SFT, where it learns to speak: 300 hear + 625 SFT spoke 3/37 held-out answers
#    right (monologue 12/24), 400 + 600 spoke 0/37 (monologue 17/24), and 300 hear + 150 speaking
#    (TTS, lead) + 475 SFT 0/37 (monologue 5/24); a doubled learning rate was worse (SFT text loss
#    0.65 vs 0.33).
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
stages = [
    # post-training: hear speech (every user voice), write each word just after it is heard
    dict(name="hear", steps=300, lr=1e-3, min_lr=5e-4, placement="word-trail", mix=[dict(task="asr")]),
    # SFT on turn-taking dialogs: write what was heard, then think the answer (lead) and say it
    dict(name="sft-dialog", steps=525, lr=8e-4, min_lr=2e-4, warmup=10, placement="lead",
         mix=[dict(task=dict(heard="word-trail"), kind="dialog", weight=2.0),
              dict(task=dict(heard="word-trail"), kind="duplex"),
              dict(task="asr", placement="word-trail", weight=0.5)]),
    # SFT with full-duplex events: keep quiet through pauses and backchannels, yield to barge-ins
    dict(name="sft-duplex", steps=100, lr=2e-4, min_lr=5e-5, warmup=5, placement="lead",
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

# Fine-tune the released FLM-Audio 7B (or any checkpoint in the official layout, e.g. one of ours)
# on your own dialogs: one SFT stage with the monologue leading, as the paper's last stage.
#   torchrun --nproc_per_node=8 train.py config/finetune_flm.py --init_path=/models/FLM-Audio \
#       --data_dir=/data/prepared --out_dir=/ckpt/ft
# Prepare the data with the checkpoint's tokenizer and Mimi (they are in its directory).
init_from = "flm"
init_path = "FLM-Audio"
parallel = "fsdp"
dtype = "bfloat16"
activation_checkpointing = True
batch_size = 2
grad_accum = 16
window_frames = 1500
stages = [
    # SFT on your dialogs: think the answer (monologue leading), say it, while listening
    dict(name="sft", steps=2000, lr=5e-6, min_lr=5e-7, warmup=50,
         mix=[dict(task="dialog", placement="lead")]),
]
eval_interval = 250
ckpt_interval = 250
keep_last = 2
verify_data = False

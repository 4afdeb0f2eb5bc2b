"""train.py -- train FLM-Audio: nanoGPT's train.py, grown up for a full-duplex voice model.

    python train.py                                  # tiny demo: builds the demo data if missing, ~14 min on 2 cores
    python train.py config/flm_7b.py --out_dir=run1  # a preset file, then --key=value overrides
    torchrun --nproc_per_node=8 train.py config/flm_7b.py     # DDP, or FSDP2 for the 7B

A run is a list of *stages* (the paper's plan: post-training stages that alternate the monologue
between leading and trailing the audio, then SFT with the monologue leading). Each stage names
its data mixture (grid.py tasks: whose sentences fill the monologue, whose voice is spoken /
heard, the placement), its loss weights and its learning-rate schedule; one code path for all.

The file reads top to bottom:
  1. configuration: DEFAULTS <- config/NAME.py presets <- --key=value
  2. processes: torchrun (gloo on CPU, NCCL on CUDA) or a single process
  3. the model: from scratch, Qwen2.5, an FLM-Audio checkpoint, or resume; DDP or FSDP2
  4. data: every micro-batch is a pure function of (seed, step, index), so torchrun ranks split
     the global batch without talking and resuming needs only the step number
  5. schedule and checkpoints (atomic, exact resume, official layout for serving)
  6. evaluation: per-stream val loss, ASR-style CER, TTS-style semantic accuracy, answer accuracy
  7. the training loop
"""
import argparse
import ast
import functools
import json
import math
import os
import re
import shutil
import socket
import sys
import time
import traceback
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)

import data
import evaluate
import lora
import sizing
from demo import corpus
from codec import CARDINALITY, FRAME_RATE
from model import FLMAudio, FLMConfig

# ----------------------------------------------------------------------------------------------
# 1. Configuration. Every key can be set in a preset file (plain Python assignments) or on the
# command line as --key=value (a Python literal; bare words are strings).

DEFAULTS = dict(
    out_dir="out/tiny_demo",           # checkpoints (ckpt-NNNNNNN/, latest -> newest) and log.jsonl
    data_dir="data_demo/prepared",     # `python data.py prepare` output
    demo_corpus=None,                  # dict of demo/corpus.py counts: build the demo corpus into data_dir if missing
    demo_codec_codes=2048,             # entries per codebook of the demo codec fitted for it
    init_from="scratch",               # scratch | qwen | flm | resume
    init_path="",                      # qwen: Qwen2.5 dir; flm: official-layout dir; resume: default out_dir/latest
    model="tiny",                      # FLMConfig preset for scratch
    model_args={},                     # FLMConfig field overrides (scratch, qwen)
    stages=[dict(name="train", steps=100, mix=[dict(task="dialog")])],
    max_steps=0,                       # stop at this global step (0 = all stages); schedule unchanged
    batch_size=8,                      # samples per micro-batch per process
    grad_accum=1,                      # micro-batches per step over ALL processes (split among them)
    window_frames=128,                 # columns per sample (80 ms each)
    lr=1e-3, min_lr=1e-4, warmup=20,   # stage defaults: linear warmup, cosine to min_lr
    text_weight=1.0, wait_weight=0.5, semantic_weight=1.0, audio_weight=1.0,   # stage defaults
    audio_noise=0.0,                   # stage default: share of its own audio codes read as random ones
    silence_keep=1.0,                  # stage default: share of silent speak columns DepthGPT trains on
    weight_decay=0.1, beta1=0.9, beta2=0.95, grad_clip=1.0,
    seed=1337,
    device="auto", dtype="auto",       # auto: bf16 autocast on CUDA, float32 on CPU (master weights fp32)
    parallel="auto",                   # ddp | fsdp | auto (fsdp on CUDA for > 2B parameters)
    activation_checkpointing=False, compile=False, threads=0,   # threads 0 = torch's default
    lora_rank=0, lora_alpha=16.0,      # LoRA (lora.py) over an init_from=flm base; rank 0 = full fine-tuning
    lora_targets=["attn", "mlp", "depth"], lora_full=[],   # adapted projections; modules trained fully
    verify_data=True,                  # CRC-check shards on open
    log_interval=10, eval_interval=100, eval_batches=4, eval_decode=16, eval_tasks=["dialog", "asr", "tts"],
    eval_spoken=80,                    # validation recordings streamed and judged from audio at the end (0 = off)
    ckpt_interval=100, keep_last=2, peak_flops=0.0,   # peak_flops 0 = guess from the GPU name
    eval_only=False,                   # evaluate the initial model (e.g. --init_from=resume) and stop
)
STAGE_NUMBERS = ("lr", "min_lr", "warmup", "text_weight", "wait_weight", "semantic_weight", "audio_weight",
                 "audio_noise", "silence_keep")                   # a stage's own value, else the run's
STAGE_KEYS = ("name", "steps", "mix", "placement", *STAGE_NUMBERS)
MIX_KEYS = ("task", "kind", "weight", "placement")


def _literal(text, key, default):
    try:
        v = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        v = text                                         # a bare word: a string
    if isinstance(default, str) and not isinstance(v, str):
        v = text                                         # --init_path=123 is the path "123"
    ok = {bool: (bool,), int: (int,), float: (int, float), str: (str,), list: (list,), dict: (dict,)}
    if isinstance(default, bool) and v in (0, 1):
        v = bool(v)
    if not isinstance(v, ok[type(default)]) or (isinstance(v, bool) and not isinstance(default, bool)):
        raise ValueError(f"--{key}={text}: expected {type(default).__name__}")
    return float(v) if isinstance(default, float) else v


def load_config(argv=None):
    ap = argparse.ArgumentParser(description="Train FLM-Audio (see the module docstring and config/*.py).",
                                 allow_abbrev=False)
    ap.add_argument("presets", nargs="*", help="config/NAME.py files, applied in order before --key=value")
    for k, v in DEFAULTS.items():
        ap.add_argument(f"--{k}", default=argparse.SUPPRESS, metavar="V", help=f"(default {v!r})",
                        **(dict(nargs="?", const="True") if isinstance(v, bool) else {}))   # bare --eval_only
    args = vars(ap.parse_args(argv))
    cfg = json.loads(json.dumps(DEFAULTS))               # a deep copy
    for preset in args.pop("presets") or [str(Path(__file__).resolve().parent / "config" / "tiny_demo.py")]:
        if not Path(preset).is_file():
            raise FileNotFoundError(f"{preset}: config preset not found")
        ns = {}
        try:                                             # a preset is Python that runs: trust your own
            exec(compile(Path(preset).read_text(), preset, "exec"), ns)
        except SyntaxError as e:
            raise ValueError(f"{preset}:{e.lineno}: syntax error: {e.msg}") from None
        except Exception as e:
            line = next((f.lineno for f in reversed(traceback.extract_tb(e.__traceback__)) if f.filename == preset), "?")
            raise ValueError(f"{preset}:{line}: {type(e).__name__}: {e}") from None
        for k, v in ns.items():
            if k.startswith("_") or callable(v) or type(v).__name__ == "module":
                continue
            if k not in DEFAULTS:
                raise ValueError(f"{preset}: unknown key {k!r}")
            cfg[k] = v
    for k, text in args.items():
        cfg[k] = _literal(text, k, DEFAULTS[k])
    return check_config(cfg)


def check_config(cfg):
    if cfg["init_from"] not in ("scratch", "qwen", "flm", "resume"):
        raise ValueError(f"init_from={cfg['init_from']!r}: choose scratch, qwen, flm or resume")
    if cfg["init_from"] in ("qwen", "flm") and not cfg["init_path"]:
        raise ValueError(f"init_from={cfg['init_from']} needs --init_path=DIR")
    if cfg["lora_rank"] and cfg["init_from"] not in ("flm", "resume"):
        raise ValueError(f"lora_rank={cfg['lora_rank']}: LoRA adapts a trained FLM-Audio; use --init_from=flm")
    if not set(cfg["lora_targets"]) <= set(lora.TARGETS) or not set(cfg["lora_full"]) <= set(lora.FULL) \
            or not cfg["lora_alpha"] > 0:
        raise ValueError(f"lora_targets {cfg['lora_targets']} (from {lora.TARGETS}), lora_full {cfg['lora_full']} "
                         f"(from {lora.FULL}), lora_alpha {cfg['lora_alpha']} (> 0)")
    if cfg["parallel"] not in ("auto", "ddp", "fsdp"):
        raise ValueError(f"parallel={cfg['parallel']!r}: choose auto, ddp or fsdp")
    if cfg["dtype"] not in ("auto", "float32", "bfloat16"):
        raise ValueError(f"dtype={cfg['dtype']!r}: choose auto, float32 or bfloat16")
    for k, least in (("batch_size", 1), ("grad_accum", 1), ("window_frames", 2), ("log_interval", 1),
                     ("keep_last", 1), ("eval_interval", 0), ("ckpt_interval", 0), ("max_steps", 0),
                     ("eval_batches", 1), ("eval_decode", 0), ("eval_spoken", 0), ("threads", 0),
                     ("demo_codec_codes", 2), ("lora_rank", 0)):
        if not isinstance(cfg[k], int) or isinstance(cfg[k], bool) or cfg[k] < least:
            raise ValueError(f"{k}={cfg[k]!r}: expected an integer >= {least}")
    for k, ok, why in (("weight_decay", lambda v: v >= 0, ">= 0"), ("grad_clip", lambda v: v > 0, "> 0"),
                       ("beta1", lambda v: 0 <= v < 1, "in [0, 1)"), ("beta2", lambda v: 0 <= v < 1, "in [0, 1)"),
                       ("peak_flops", lambda v: v >= 0, ">= 0 (0 = guess)"), ("lr", lambda v: v > 0, "> 0"),
                       *((k, lambda v: v >= 0, ">= 0") for k in STAGE_NUMBERS if k != "lr")):
        if not isinstance(cfg[k], (int, float)) or not ok(cfg[k]):
            raise ValueError(f"{k}={cfg[k]!r}: expected a number {why}")
    if not cfg["stages"]:
        raise ValueError("stages: need at least one stage")
    for i, st in enumerate(cfg["stages"]):
        bad = set(st) - set(STAGE_KEYS)
        if bad or not isinstance(st.get("steps"), int) or st["steps"] < 1 or not st.get("mix"):
            raise ValueError(f"stages[{i}]: needs steps (int >= 1) and mix (list); unknown keys {sorted(bad)}")
        for e in st["mix"]:
            if not isinstance(e, dict) or "task" not in e or set(e) - set(MIX_KEYS):
                raise ValueError(f"stages[{i}].mix: each entry is a dict with task (+ kind, weight, placement)")
        for k in STAGE_NUMBERS:
            st.setdefault(k, cfg[k])
            if not isinstance(st[k], (int, float)) or st[k] < 0 or (k == "lr" and st[k] == 0):
                raise ValueError(f"stages[{i}].{k}={st[k]!r}: expected a number >= 0" + (" (lr > 0)" if k == "lr" else ""))
        if st["audio_noise"] > 1:
            raise ValueError(f"stages[{i}].audio_noise={st['audio_noise']!r}: expected a share in [0, 1]")
        if not 0 < st["silence_keep"] <= 1:
            raise ValueError(f"stages[{i}].silence_keep={st['silence_keep']!r}: expected a share in (0, 1]")
        if st["min_lr"] > st["lr"]:
            raise ValueError(f"stages[{i}]: min_lr={st['min_lr']} exceeds lr={st['lr']}")
        st.setdefault("name", f"stage{i}")
    return cfg


# ----------------------------------------------------------------------------------------------
# 2. Processes. torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; without them this is one process.

def setup_processes(cfg):
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    dev = cfg["device"] if cfg["device"] != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if dev == "cuda":
        dev = f"cuda:{local}"
        torch.cuda.set_device(dev)
    if (world > 1 or cfg["parallel"] == "fsdp") and not dist.is_initialized():
        if "MASTER_PORT" not in os.environ:             # FSDP2 in one process, without torchrun
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(s.getsockname()[1]), RANK="0", WORLD_SIZE="1")
        dist.init_process_group("nccl" if dev.startswith("cuda") else "gloo")
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    return rank, world, torch.device(dev)


# ----------------------------------------------------------------------------------------------
# 3. The model. Weights are float32 master weights; bf16 is a compute dtype (autocast / FSDP).

def build_model(cfg, log, index, dtype=torch.float32):
    how, path = cfg["init_from"], cfg["init_path"]
    torch.manual_seed(cfg["seed"])                      # fresh parts (audio tables, DepthGPT) are seeded
    if how == "scratch":                                # the vocabularies are the data's tokenizer's and codec's
        text = {} if index.get("tokenizer_wait_id") is None else dict(
            vocab_size=-(-index["tokenizer_n_vocab"] // 8) * 8, text_wait_token_id=index["tokenizer_wait_id"])
        # a demo codec of 64 codes: 66 audio ids (codes, <empty>, <pad>) instead of Mimi's 2050, so no
        # step pays for 1,984 rows of embeddings, DepthGPT heads and their Adam state that never occur
        n = index.get("codec_cardinality", CARDINALITY)
        audio = dict(aud_vocab_size=n + 2, aud_emp_token_id=n, aud_pad_token_id=n + 1)
        return FLMAudio(replace(FLMConfig.preset(cfg["model"]), **{**text, **audio, **cfg["model_args"]})), None
    if how == "qwen":                                   # the Qwen model's shape, model_args on top
        log(f"init: Qwen language model from {path} (audio embeddings and DepthGPT start fresh)")
        return FLMAudio.from_qwen(path, **cfg["model_args"]), None
    state = None
    if how == "flm":
        log(f"init: FLM-Audio weights from {path}")
        # LoRA: the frozen base is held in the compute dtype, the adapters in float32 (lora.py)
        model = FLMAudio.from_pretrained(path, dtype=dtype if cfg["lora_rank"] else torch.float32).train()
        if cfg["lora_rank"]:
            lora.add(model, cfg["lora_rank"], cfg["lora_alpha"], cfg["lora_targets"], cfg["lora_full"],
                     base=Path(path).resolve())
    else:
        path = Path(path or Path(cfg["out_dir"]) / "latest")
        if not (path / "training_state.pt").is_file():
            raise FileNotFoundError(f"{path}: no training_state.pt to resume from")
        log(f"resume: {path.resolve()}")
        adapter = path / lora.ADAPTER_FILE               # a LoRA run keeps its adapters, not the base
        if adapter.is_file():
            model = lora.load(FLMAudio.from_pretrained(lora.base_of(adapter), dtype=dtype), adapter).train()
        else:
            model = FLMAudio.from_pretrained(path).train()
        try:                                             # tensors and plain values only: no pickle
            state = torch.load(path / "training_state.pt", weights_only=True)
        except Exception as e:
            raise ValueError(f"{path / 'training_state.pt'}: unreadable training state "
                             f"({str(e).splitlines()[0][:200]})") from None
    evaluate.check_codec(cfg["data_dir"], path)
    for k, v in cfg["model_args"].items():             # the checkpoint fixes the shape
        if getattr(model.cfg, k, None) != v:
            raise ValueError(f"model_args {k}={v!r} conflicts with {path}/config.json ({getattr(model.cfg, k, None)!r})")
    return model, state


def parallelize(model, cfg, world, device, dtype):
    """Activation checkpointing, compile, then DDP or FSDP2. Returns (module to call, mode)."""
    mode = cfg["parallel"]
    if mode == "auto":
        mode = "fsdp" if device.type == "cuda" and model.num_params() > 2e9 else "ddp"
    if cfg["activation_checkpointing"]:                 # recompute each decoder layer in backward
        from torch.utils.checkpoint import checkpoint
        for layer in model.layers:
            layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)
    if cfg["compile"]:                                   # in place: state-dict names stay the same
        for layer in model.layers:
            layer.compile()
        model.depth_gpt.compile(dynamic=True)           # its batch = selected columns, varies
    single = world == 1 and cfg["parallel"] != "fsdp"    # --parallel=fsdp: FSDP2 even in one process
    if single or mode == "ddp":
        model.to(device)
    if single:
        return model, "single"
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None), mode
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for layer in model.layers:                           # one all-gather per layer, freed after use
        fully_shard(layer, mp_policy=mp)
    fully_shard(model.depth_gpt, mp_policy=mp)
    fully_shard(model, mp_policy=mp)                     # embeddings, final norm, lm_head
    model.to(device)                                     # each rank moves only its shards
    return model, mode


def make_optimizer(model, cfg):
    params = [p for p in model.parameters() if p.requires_grad]      # LoRA: adapters (and `full`) only
    decay = [p for p in params if p.dim() >= 2]                      # matrices and embeddings
    rest = [p for p in params if p.dim() < 2]                        # biases and norms
    groups = [{"params": decay, "weight_decay": cfg["weight_decay"]}, {"params": rest, "weight_decay": 0.0}]
    # fused: one kernel over all tensors, on CPU too (an eighth of the per-tensor loop's time on the demo)
    return torch.optim.AdamW(groups, lr=cfg["lr"], betas=(cfg["beta1"], cfg["beta2"]), fused=True)


# ----------------------------------------------------------------------------------------------
# 4. Data. A stage's mix is a list of {task, kind, weight, placement}: `task` is a data.py task
# name ("dialog", "asr", "tts") or a dict of Task fields; `kind` filters dialogs ("dialog",
# "utterance", None = all). Samples of a micro-batch are split among entries by weight.

def ensure_demo_data(cfg, rank, log):
    """The embedded demo corpus, synthesised and prepared into data_dir once (rank 0), if asked for."""
    if rank == 0 and cfg["demo_corpus"] is not None:
        corpus.ensure_prepared(Path(cfg["data_dir"]), cfg["demo_corpus"], cfg["demo_codec_codes"], log)
    if dist.is_initialized():
        dist.barrier()


class Mixture:
    def __init__(self, root, mcfg, verify):
        self.root, self.mcfg, self.verify, self.sets = Path(root), mcfg, verify, {}

    def dataset(self, split, kind=None):
        if (split, kind) not in self.sets:
            self.sets[split, kind] = data.ShardDataset(self.root, split, kind, verify=self.verify)
        return self.sets[split, kind]

    @staticmethod
    def task(entry, stage=None):
        t = data.as_task(entry["task"])
        placement = entry.get("placement") or (stage or {}).get("placement")
        return replace(t, placement=placement) if placement else t

    def batch(self, stage, seed, step, index, batch_size, window, split="train"):
        """Micro-batch `index` of optimizer step `step`: (tokens [B, 17, T], weights [B, 9, T], the
        inputs as the model reads them: None where they are the tokens)."""
        rng = np.random.default_rng([seed, step, index])
        w = np.array([float(e.get("weight", 1.0)) for e in stage["mix"]])
        counts = rng.multinomial(batch_size, w / w.sum())
        keep, thin = stage.get("silence_keep", 1.0), np.random.default_rng([seed, step, index, 1])
        parts = [self.dataset(split, e.get("kind")).get_batch(int(n), window, self.mcfg, task=self.task(e, stage),
                                                                 rng=rng, silence_keep=keep, silence_rng=thin)
                 for e, n in zip(stage["mix"], counts) if n]
        tok, w = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        if not stage.get("audio_noise"):
            return tok, w, None
        # Its own voice as it reads it back, a share of the codes replaced by random ones. Speaking
        # freely it reads its own codes, not the recording's, and without this its slips compound
        # frame by frame (evaluate.py --speech_probe: teacher-forced vs own audio).
        rows, n = slice(1, self.mcfg.aud_channel + 1), self.mcfg.aud_emp_token_id   # real codes are < n
        speak = tok[:, rows].numpy()
        hit = (rng.random(speak.shape) < stage["audio_noise"]) & (speak < n)
        inp = tok.clone()
        inp[:, rows] = torch.from_numpy(np.where(hit, rng.integers(0, n, speak.shape), speak))
        return tok, w, inp


# ----------------------------------------------------------------------------------------------
# 5. Schedule and checkpoints. A checkpoint directory is the official layout (config.json +
# safetensors, loadable by FLMAudio.from_pretrained, chat.py and the official code) plus
# training_state.pt (optimizer, step, RNG), train_config.json, and the data's tokenizer and codec.

def stage_at(stages, step):
    """(stage index, stage, step within the stage) of a global step; past the end: the last stage."""
    start = 0
    for i, st in enumerate(stages):
        if step < start + st["steps"] or i == len(stages) - 1:
            return i, st, step - start
        start += st["steps"]


def lr_at(stage, s):
    if s < stage["warmup"]:
        return stage["lr"] * (s + 1) / stage["warmup"]
    frac = min(1.0, (s - stage["warmup"]) / max(1, stage["steps"] - stage["warmup"]))
    return stage["min_lr"] + 0.5 * (1 + math.cos(math.pi * frac)) * (stage["lr"] - stage["min_lr"])


def checkpoints(out_dir):
    return sorted(p for p in Path(out_dir).glob("ckpt-*") if p.is_dir() and re.fullmatch(r"ckpt-\d+", p.name))


def data_files(data_dir):
    """(source, name in the checkpoint) of the tokenizer files and codec the data was prepared with."""
    root = Path(data_dir)
    index = json.loads((root / "index.json").read_text())
    out = []
    if index.get("tokenizer"):
        out += [(f, f.name) for f in sorted((root / index["tokenizer"]).glob("*")) if f.is_file()]
    codec = root / index["codec"] if index.get("codec") else None    # relative to the data, or absolute
    if codec and codec.is_file():
        out.append((codec, data.CODEC_FILES[data.codec_kind(codec)]))
    return out


def save_checkpoint(model, optimizer, step, cfg, rank, log):
    """All ranks gather full state dicts (a collective under FSDP); rank 0 writes into a temporary
    directory and renames it into place, so a crash mid-write leaves the previous one intact."""
    adapters = getattr(model, "lora", None)              # LoRA: only what trains is saved, not the base
    full = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=bool(adapters))
    msd = get_model_state_dict(model, options=full)
    osd = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        out = Path(cfg["out_dir"])
        final, tmp = out / f"ckpt-{step:07d}", out / f".tmp-ckpt-{step:07d}"
        shutil.rmtree(tmp, ignore_errors=True)
        if adapters:                                     # chat.py and lora.py merge it with its base
            tmp.mkdir(parents=True)
            lora.save(tmp / lora.ADAPTER_FILE, msd, adapters)
        else:
            with torch.device("meta"):
                export = FLMAudio(model.cfg)
            export.load_state_dict(msd, assign=True)
            export.save_pretrained(tmp)
        name, keys, pos, has_gauss, gauss = np.random.get_state()   # as plain values, loadable without pickle
        torch.save({"step": step, "optimizer": osd, "torch_rng": torch.get_rng_state(),
                    "numpy_rng": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]},
                   tmp / "training_state.pt")
        (tmp / "train_config.json").write_text(json.dumps(cfg, indent=1))
        for src, name in data_files(cfg["data_dir"]):
            shutil.copy(src, tmp / name)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        link = out / "latest.tmp"
        if link.is_symlink() or link.exists():
            link.unlink()
        os.symlink(final.name, link)
        os.replace(link, out / "latest")
        for old in checkpoints(out)[:-cfg["keep_last"]] if cfg["keep_last"] > 0 else []:
            shutil.rmtree(old)
        log(f"saved {final}")
    if dist.is_initialized():
        dist.barrier()


# ----------------------------------------------------------------------------------------------
# 6. The loop.

def train(argv=None):
    cfg = load_config(argv)
    rank, world, device = setup_processes(cfg)
    log = print if rank == 0 else (lambda *a, **k: None)
    out = Path(cfg["out_dir"])
    if cfg["init_from"] != "resume" and not cfg["eval_only"] and checkpoints(out):
        raise ValueError(f"{out}: holds checkpoints of an earlier run; pass --init_from=resume to continue "
                         "it, or choose another --out_dir")
    ensure_demo_data(cfg, rank, log)
    index_file = Path(cfg["data_dir"]) / "index.json"
    if not index_file.is_file():
        raise FileNotFoundError(f"{index_file}: not found; prepare data first (python data.py prepare "
                                f"--manifest FILE --out {cfg['data_dir']})")
    index = json.loads(index_file.read_text())
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob(".tmp-ckpt-*"):            # left by a crash mid-write
            shutil.rmtree(stale)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16}[cfg["dtype"]]
    model, state = build_model(cfg, log, index, dtype)
    mcfg = model.cfg
    if index.get("tokenizer_wait_id") not in (None, mcfg.text_wait_token_id) or \
            index.get("tokenizer_n_vocab", 0) > mcfg.vocab_size:
        raise ValueError(f"{index_file}: the data's tokenizer ({index.get('tokenizer_n_vocab')} tokens, <wait> = "
                         f"{index.get('tokenizer_wait_id')}) does not fit the model (vocab_size {mcfg.vocab_size}, "
                         f"text_wait_token_id {mcfg.text_wait_token_id})")
    n_params = model.num_params()
    wrapped, mode = parallelize(model, cfg, world, device, dtype)
    log(f"model: {n_params / 1e6:.1f}M parameters, {world} process(es) on {device}, {mode}, {dtype}")
    ckpt, cbytes = cfg["activation_checkpointing"], torch.finfo(dtype).bits // 8
    log(sizing.memory_line(sizing.memory_plan(mcfg, world, cfg["batch_size"], cfg["window_frames"], mode, ckpt,
                                              cbytes, getattr(model, "lora", None)),
                           world, cfg["batch_size"], cfg["window_frames"], mode, ckpt))
    optimizer = make_optimizer(model, cfg)
    step = 0
    if state is not None:
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
        torch.set_rng_state(state["torch_rng"])
        name, keys, *rest = state["numpy_rng"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
        step = state["step"]
    amp = torch.autocast(device.type, dtype) if dtype != torch.float32 and mode != "fsdp" else nullcontext()
    mix = Mixture(cfg["data_dir"], mcfg, cfg["verify_data"])
    enc = data.load_tokenizer(Path(cfg["data_dir"]) / index["tokenizer"] if index.get("tokenizer") else None)
    if cfg["grad_accum"] % world:
        raise ValueError(f"grad_accum={cfg['grad_accum']} must be a multiple of the {world} processes")
    accum = cfg["grad_accum"] // world
    total = sum(st["steps"] for st in cfg["stages"])
    end = min(total, cfg["max_steps"]) if cfg["max_steps"] else total
    fpc, peak = sizing.flops_per_column(mcfg, cfg["window_frames"]), cfg["peak_flops"] or sizing.guess_peak_flops(device)
    logf = open(out / "log.jsonl", "a") if rank == 0 else None

    def record(obj):
        if logf:
            logf.write(json.dumps(obj) + "\n")
            logf.flush()

    def do_eval(final=False):
        if mode == "fsdp":                               # root-level weights, gathered for direct calls
            model.unshard()
        ev = evaluate.evaluate(model, mix.dataset("val"), mix.dataset("train"), enc, cfg["eval_tasks"],
                               cfg["eval_batches"], cfg["batch_size"], cfg["window_frames"], cfg["eval_decode"],
                               cfg["seed"], amp, evaluate.dialog_task(cfg["stages"]))
        if mode == "fsdp":
            model.reshard()
        if final and cfg["eval_spoken"] and rank == 0:
            if mode == "fsdp":
                log(f"spoken evaluation: python evaluate.py --checkpoint {out / 'latest'} --data_dir {cfg['data_dir']}")
            else:                                        # the full loop, as served, judged from the audio
                codec = data.load_codec(Path(cfg["data_dir"]) / index["codec"], device=device)
                ev["spoken"] = evaluate.spoken(model, codec, mix.dataset("val"), cfg["eval_spoken"], cfg["seed"],
                                              enc)
                try:                                     # the recordings may have moved since prepare
                    ev["demo_question"] = evaluate.demo_question(model, codec, enc, mix.dataset("val"), out,
                                                                 cfg["seed"], log)
                except (FileNotFoundError, ValueError) as e:
                    log(f"demo question skipped: {e}")
        record({"step": step, "eval": ev})
        v = ev.get("val_dialog", {})
        log(f"eval @ {step}: val dialog loss {v.get('loss', float('nan')):.3f} (text {v.get('text', 0):.3f} "
            f"wait {v.get('wait', 0):.3f} sem {v.get('audio_0', 0):.3f}) | asr CER {ev['asr_cer']:.3f} | monologue "
            + " ".join(f"{k[10:]} {x}" for k, x in ev.items() if k.startswith("monologue_"))
            + f" | answer loss {ev.get('answer_loss', 0):.3f} (another user's audio {ev.get('answer_loss_other_audio', 0):.3f})")
        if final:
            log(evaluate.table(ev))
        return ev

    if cfg["eval_only"]:
        return do_eval(final=True)
    log(f"training steps {step}..{end} of {total}: global batch {cfg['batch_size'] * cfg['grad_accum']} x "
        f"{cfg['window_frames']} frames, {mode}")
    last_ckpt = step
    while step < end:
        t0 = time.time()
        _, stage, s = stage_at(cfg["stages"], step)
        lr = lr_at(stage, s)
        for g in optimizer.param_groups:
            g["lr"] = lr
        sums = {}
        for m in range(accum):
            tok, w, inp = mix.batch(stage, cfg["seed"], step, rank * accum + m, cfg["batch_size"],
                                    cfg["window_frames"])
            tok, w = tok.to(device, non_blocking=True), w.to(device, non_blocking=True)
            inp = None if inp is None else inp.to(device, non_blocking=True)
            if mode == "ddp":                            # all-reduce only on the last micro-batch
                wrapped.require_backward_grad_sync = m == accum - 1
            elif mode == "fsdp":
                wrapped.set_requires_gradient_sync(m == accum - 1)
            with amp:
                loss, parts = wrapped(tok, w, text_weight=stage["text_weight"], wait_weight=stage["wait_weight"],
                                      semantic_weight=stage["semantic_weight"], audio_weight=stage["audio_weight"],
                                      inputs=inp)
            (loss / accum).backward()
            for k, v in [("loss", loss), *parts.items()]:
                sums[k] = sums.get(k, 0.0) + float(v.detach()) / cfg["grad_accum"]
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if world > 1:                                    # the logged losses are means over all ranks
            vec = torch.tensor(list(sums.values()), dtype=torch.float64, device=device)
            dist.all_reduce(vec)
            sums = dict(zip(sums, vec.cpu().tolist()))
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.time() - t0
        frames = cfg["batch_size"] * cfg["grad_accum"] * (cfg["window_frames"] - 1)
        rec = {"step": step, "stage": stage["name"], "lr": lr, **sums, "grad_norm": float(norm),
               "step_ms": 1000 * dt, "frames_per_s": frames / dt, "tokens_per_s": 17 * frames / dt}
        if peak:
            rec["mfu"] = fpc * frames / dt / (peak * world)
        record(rec)
        if step % cfg["log_interval"] == 0 or step == end or step == 1:
            log(f"step {step}/{end} [{stage['name']}] loss {sums['loss']:.4f} | text {sums['text']:.3f} "
                f"wait {sums['wait']:.3f} sem {sums['audio_0']:.3f} ac1 {sums['audio_1']:.3f} | lr {lr:.2e} | "
                f"{1000 * dt:.0f} ms, {frames / dt:.0f} frames/s ({frames / dt / FRAME_RATE:.1f}x real time)"
                + (f", MFU {rec['mfu']:.1%}" if peak else ""))
        if cfg["eval_interval"] and step % cfg["eval_interval"] == 0 and step < end:
            do_eval()
        if cfg["ckpt_interval"] and step % cfg["ckpt_interval"] == 0 and step < end:
            save_checkpoint(model, optimizer, step, cfg, rank, log)
            last_ckpt = step
    if last_ckpt != step or not checkpoints(out):
        save_checkpoint(model, optimizer, step, cfg, rank, log)
    result = do_eval(final=True) if cfg["eval_interval"] and end > 0 else None
    log(f"done. checkpoint: {out / 'latest'} (official layout + training state); try: "
        f"python chat.py --checkpoint {out / 'latest'} --input IN.wav --output OUT.wav")
    if logf:
        logf.close()
    return result


def main(argv=None):
    try:
        train(argv)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()

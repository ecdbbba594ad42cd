"""The GPU session that trained the tiny v2 weights (kept as a record of how they were made; not part of the package).

On a machine lent for a few minutes, with this layout in the repository copy it ran in:
  .gpu/src/lvstudio              this package (the commit that added this script)
  .gpu/vae.toml, .gpu/df.toml    presets/tiny/train_vae.toml and train_df.toml with device = "cuda", data_workers
  .gpu/vae_run/checkpoint.safetensors   the VAE run's CPU checkpoint (step 12,250; decoder-only phase)
  .gpu/encoder_stage.safetensors        the VAE at step 4,000 (its encoder is frozen from there: the DiT's latents)
it measures one VAE and one DiT training step on the GPU, sizes both runs to fit BUDGET_S seconds, runs the repo's own
recipes side by side (`lvstudio train vae` resumed, `lvstudio train diffusion-forcing` from scratch, each in its own
process), stops them gracefully at the deadline (a checkpoint is written) and exports fp16 DiT/text and the VAE, with
both training logs, to $OUT.  Usage: python3 .gpu/drive.py BUDGET_S [dry] [df-only]   (dry: a CPU rehearsal, a few
steps). df-only: no VAE run; the DiT run gets the whole lease and starts from the weights .gpu/df.toml names
(init_dit/init_text: the latest CPU export, e.g. runs/tiny_df_v2f/dit.safetensors copied into .gpu/), at lr 3e-4."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

T0 = time.time()
G = Path(".gpu")
OUT = Path(os.environ.get("OUT", "/tmp/gpu_out"))
ENV = dict(os.environ, PYTHONPATH=f"{G}/src:/tmp/site", PYTHONUNBUFFERED="1")
sys.path[:0] = [f"{G}/src", "/tmp/site"]


def say(*a):
    msg = f"[{time.time() - T0:6.1f}s] " + " ".join(map(str, a))
    print(msg, flush=True)
    with open(OUT / "drive.log", "a") as fh:
        fh.write(msg + "\n")


def set_keys(path: Path, **kv):
    s = path.read_text()
    for k, v in kv.items():
        line = f"{k} = {json.dumps(v)}"
        s, n = re.subn(rf"(?m)^{k} = .*$", line, s)
        if not n:
            s = line + "\n" + s
    path.write_text(s)


import torch  # noqa: E402

from lvstudio.train.common import DistInfo, load_config  # noqa: E402
from lvstudio.train.data import latent_dataset, sample_batch  # noqa: E402
from lvstudio.train.diffusion_forcing import DFConfig, build_model, df_loss, ship_weights  # noqa: E402
from lvstudio.train.loop import EMA, forward_precision, optimizer_step, step_generator  # noqa: E402
from lvstudio.train.vae_config import VAEFileConfig  # noqa: E402

BUDGET, DRY, DEV = 0.0, False, "cpu"


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


# Step 1: VAE step time (decoder phase) on random data.
def probe_vae() -> float:
    from lvstudio.models.tiny_vae import TinyVAE, TinyVAEConfig
    from lvstudio.train.vae_recipe import VAETrainConfig, _losses

    fc = load_config(G / "vae.toml", VAEFileConfig)
    mc = TinyVAEConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fc.model.items()})
    cfg = VAETrainConfig(clip_frames=fc.clip_frames, crop=fc.crop, object_weight=fc.object_weight,
                         freeze_encoder_at=fc.freeze_encoder_at, latent_noise=fc.latent_noise,
                         restart_prob=fc.restart_prob, model=mc)
    vae = TinyVAE(mc).to(DEV)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-4)
    vae.encoder.requires_grad_(False)
    x = torch.rand(fc.batch_size, 3, fc.clip_frames, fc.crop, fc.crop, device=DEV) * 2 - 1
    gen = torch.Generator().manual_seed(0)
    n = 30 if not DRY else 3
    for i in range(n + 5):
        if i == 5:
            sync()
            t = time.time()
        terms = _losses(cfg, vae, x, gen, 10**6)
        optimizer_step(opt, terms["loss"], vae.parameters(), 1.0)
    sync()
    dt = (time.time() - t) / n
    del vae, opt
    return dt


# Step 2: DF step time at a batch size, on the real dataset.
def probe_df(cfg: DFConfig, data, batch: int) -> float:
    from lvstudio.world import vocabulary

    cfg = cfg.model_copy(update={"batch_size": batch})
    model = build_model(cfg, vocabulary(), data.latents.shape[1]).to(DEV)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ema = EMA(model, 0.999)
    n = 30 if not DRY else 2
    for i in range(n + 5):
        if i == 5:
            sync()
            t = time.time()
        rng, gen = step_generator(0, i, 0)
        b = sample_batch(data, cfg, rng).to(DEV)
        with forward_precision(cfg.precision, torch.device(DEV)):  # the run's own precision
            loss = df_loss(model, b, cfg, gen)
        optimizer_step(opt, loss, model.parameters(), 1.0)
        ema.update(model)
    sync()
    dt = (time.time() - t) / n
    del model, opt, ema
    return dt


def launch(args, name):
    fh = open(OUT / f"{name}.out", "w")
    code = f"import sys; sys.path[:0] = ['{G}/src', '/tmp/site']; from lvstudio.cli import main; main()"
    return subprocess.Popen([sys.executable, "-c", code, "train", *args], env=ENV,
                            stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)


def stop(p, name, grace=25.0):
    if p.poll() is None:
        say("stopping", name)
        os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    say(name, "exit code", p.returncode)


def main():
    global BUDGET, DRY, DEV
    BUDGET = float(sys.argv[1])
    DRY = "dry" in sys.argv[2:]
    df_only = "df-only" in sys.argv[2:]
    OUT.mkdir(parents=True, exist_ok=True)
    say("torch", torch.__version__, "cuda", torch.cuda.is_available(),
        torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
    DEV = "cuda" if torch.cuda.is_available() and not DRY else "cpu"
    if DRY:
        if not df_only:
            set_keys(G / "vae.toml", device="cpu", data_workers=2, eval_batches=1, stats_batches=2)
        set_keys(G / "df.toml", device="cpu", data_workers=2, dataset_clips=24)
    END = BUDGET - 50  # training must stop here; the rest exports and copies
    vae_p = None
    if not df_only:
        t_vae = probe_vae()
        say(f"VAE step {t_vae * 1000:.1f} ms")
        start_vae = 12250
        window = END - (time.time() - T0) - 40  # the DF dataset build comes first, the VAE runs meanwhile
        vae_steps = min(24000, start_vae + max(250, int(0.45 * window / t_vae) // 250 * 250))
        if DRY:
            vae_steps = start_vae + 2
        set_keys(G / "vae.toml", steps=vae_steps, ckpt_every=250 if not DRY else 1)
        vae_p = launch(["vae", str(G / "vae.toml")], "vae")
        say("VAE run to step", vae_steps)

    df_cfg = load_config(G / "df.toml", DFConfig)
    Path(df_cfg.out_dir).mkdir(parents=True, exist_ok=True)
    data = latent_dataset(df_cfg, Path(df_cfg.out_dir), DistInfo())
    say("DF dataset", tuple(data.latents.shape), "objects", None if data.objects is None else tuple(data.objects.shape))
    small, large = (64, 128) if not DRY else (2, 4)  # a CPU rehearsal only checks that the steps run
    t64 = probe_df(df_cfg, data, small)
    t128 = probe_df(df_cfg, data, large)
    say(f"DF step {t64 * 1000:.1f} ms @{small}, {t128 * 1000:.1f} ms @{large}")
    if DEV == "cuda":
        torch.cuda.empty_cache()
    left = END - (time.time() - T0) - 15
    batch, t = (large, t128) if t128 < 1.8 * t64 and 0.85 * left / t128 >= 2000 else (small, t64)
    steps = max(200, int(0.85 * left / t) // 100 * 100) if not DRY else 4
    set_keys(G / "df.toml", steps=steps, batch_size=batch, lr=3e-4 if df_only else 1e-3,
             warmup_steps=min(300, steps // 10), decay_start=int(steps * 0.6), ema_decay=0.999,
             ema_start=min(1000, steps // 5), ckpt_every=500)
    del data
    df_p = launch(["diffusion-forcing", str(G / "df.toml"), "--no-progress"], "df")
    say("DF run", steps, "steps at batch", batch)

    while time.time() - T0 < END and (df_p.poll() is None or (vae_p is not None and vae_p.poll() is None)):
        time.sleep(2)
    stop(df_p, "df")
    if vae_p is not None:
        stop(vae_p, "vae")

    # Step 3: export what was trained (the finished weights, else the latest checkpoint's).
    try:
        run = Path(df_cfg.out_dir)
        if not (run / "dit.safetensors").exists():
            from lvstudio.train.diffusion_forcing import export_checkpoint

            export_checkpoint(load_config(G / "df.toml", DFConfig))
        for p in ship_weights(run, OUT, "float16"):
            say("wrote", p, p.stat().st_size)
    except Exception as err:  # noqa: BLE001
        say("DF export failed:", repr(err))
    try:
        vae_out = G / "vae_run" / "vae_export.safetensors"
        if df_only:
            vae_out = G / "vae.safetensors"  # no VAE run: ship the VAE the latents and the weights were made with
        if vae_out.exists():
            shutil.copyfile(vae_out, OUT / "vae.safetensors")
        else:  # stopped early: the checkpoint's weights with the (frozen) encoder's latent statistics
            from lvstudio.models.tiny_vae import TinyVAE, TinyVAEConfig, load_vae, save_vae
            from lvstudio.train.loop import read_checkpoint

            enc = load_vae(G / "encoder_stage.safetensors")
            fc = load_config(G / "vae.toml", VAEFileConfig)
            vae = TinyVAE(TinyVAEConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fc.model.items()}))
            t, _ = read_checkpoint(G / "vae_run" / "checkpoint.safetensors", "vae")  # verified, a VAE run's
            vae.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("model/")})
            vae.set_latent_stats(enc.config.latents_mean, enc.config.latents_std)
            save_vae(vae, OUT / "vae.safetensors")
        say("wrote vae", (OUT / "vae.safetensors").stat().st_size)
    except Exception as err:  # noqa: BLE001
        say("VAE export failed:", repr(err))
    for src, dst in [(Path(df_cfg.out_dir) / "train_log.jsonl", "df_log.jsonl"),
                     (G / "vae_run" / "train_log.jsonl", "vae_log.jsonl")]:
        if src.exists():
            shutil.copyfile(src, OUT / dst)
    say("done")


if __name__ == "__main__":
    main()

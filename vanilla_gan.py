"""A vanilla GAN (Goodfellow et al., 2014) on MNIST, in one file.

Two fully connected networks play a game. The Generator G turns random noise z into images; the
Discriminator D looks at an image and says how likely it is to be real. D learns to tell real digits
from G's fakes, G learns to fool D. At the equilibrium G draws digits D cannot tell from real ones.

    python vanilla_gan.py --epochs 50 --batch-size 128        # train (--config NAME: a classic setup)
    python vanilla_gan.py --resume runs/20261122-101500        # continue a run
    python vanilla_gan.py --generate 64 --checkpoint runs/20261122-101500

Lines 1 to 183 are the whole algorithm: the two networks, one training step, one epoch and sampling;
its code uses nothing but torch (and copy). Below the marked line is the script around it: data,
checkpoints, outputs, the quality report, the command line and main().
"""
import argparse
import copy
import csv
import datetime
import difflib
import errno
import gzip
import hashlib
import io
import math
import os
import pickle
import re
import shlex
import shutil
import signal
import sys
import time
from collections import namedtuple
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

IMAGE_SHAPE = (1, 28, 28)  # every image here is a (1, 28, 28) tensor with values in [-1, 1]
ACTIVATIONS = {"leakyrelu": lambda: nn.LeakyReLU(0.2), "relu": nn.ReLU}


def mlp(widths, activation, batchnorm=False, dropout=0.0):
    """Linear layers of the given widths; each hidden one followed by (BatchNorm,) the activation (, Dropout)."""
    layers = []
    for width_in, width_out in zip(widths[:-2], widths[1:-1]):
        layers.append(nn.Linear(width_in, width_out))
        if batchnorm:
            layers.append(nn.BatchNorm1d(width_out))
        layers.append(ACTIVATIONS[activation]())
        if dropout:
            layers.append(nn.Dropout(dropout))
    return [*layers, nn.Linear(widths[-2], widths[-1])]


class Generator(nn.Module):
    """Noise z (N, latent_dim) -> images (N, 1, 28, 28) in [-1, 1]."""

    def __init__(self, latent_dim=100, hidden=(256, 512), activation="leakyrelu", batchnorm=False):
        super().__init__()
        self.latent_dim = latent_dim
        # Tanh squashes the output into [-1, 1], the range of the rescaled data.
        self.net = nn.Sequential(*mlp([latent_dim, *hidden, 28 * 28], activation, batchnorm), nn.Tanh())

    def forward(self, z):
        return self.net(z).view(-1, *IMAGE_SHAPE)


class Discriminator(nn.Module):
    """Images (N, 1, 28, 28) -> one logit each, log(p / (1 - p)) for p = P(real): above 0 means 'real'."""

    def __init__(self, hidden=(512, 256), dropout=0.4):
        super().__init__()
        # LeakyReLU(0.2) keeps a gradient for negative inputs, so D never goes silent on G.
        # Dropout makes D a noisier, slower critic that cannot memorise the real digits, so G keeps
        # a useful gradient towards every digit (Goodfellow et al. trained D with it; G has none:
        # noise in G would only blur its images). No Sigmoid at the end: the loss applies it.
        self.net = nn.Sequential(nn.Flatten(), *mlp([28 * 28, *hidden, 1], "leakyrelu", dropout=dropout))

    def forward(self, images):
        return self.net(images)


def make_optimizer(net, lr=2e-4, betas=(0.5, 0.999)):
    # beta1 = 0.5 rather than 0.9: shorter momentum, so each network follows the other's recent moves
    # (Radford et al., 2015). fused: one kernel updates all the weights instead of one per tensor.
    fused = next(net.parameters()).device.type in ("cpu", "cuda")
    return torch.optim.Adam(net.parameters(), lr=lr, betas=betas, fused=fused)


# Binary cross-entropy of a logit l with label y: -[y log sigmoid(l) + (1 - y) log(1 - sigmoid(l))].
# Taking logits keeps it exact where a separate sigmoid would round to 0 or 1 and the log blow up.
bce = nn.BCEWithLogitsLoss()


def train_step(G, D, opt_G, opt_D, real, z, amp=False):
    """One D update and one G update. Returns the tensor [Loss_D, Loss_G, D(x), D(G(z))], left on
    the device: reading it would make the host wait for the device."""
    n = len(real)
    with torch.autocast(real.device.type, dtype=torch.bfloat16, enabled=amp):
        fake = G(z)  # one fake batch serves both updates
        # D maximises log D(x) + log(1 - D(G(z))). detach(): this update must not reach G.
        logits = D(torch.cat([real, fake.detach()]))  # one D pass over real and fake together
        real_logits, fake_logits = logits[:n].float(), logits[n:].float()
        loss_D = (bce(real_logits, torch.ones_like(real_logits))
                  + bce(fake_logits, torch.zeros_like(fake_logits)))
    opt_D.zero_grad()
    loss_D.backward()
    opt_D.step()

    # G maximises log D(G(z)), the non-saturating loss: minimising log(1 - D(G(z))) instead gives G
    # no gradient exactly when it is bad and D confident. D is frozen meanwhile, which only saves work:
    # no gradient for D's weights is computed, just the one that flows back through D into G.
    D.requires_grad_(False)
    try:
        with torch.autocast(real.device.type, dtype=torch.bfloat16, enabled=amp):
            fooled_logits = D(fake).float()  # the updated D judges the same fakes
            loss_G = bce(fooled_logits, torch.ones_like(fooled_logits))
        opt_G.zero_grad()
        loss_G.backward()
        opt_G.step()
    finally:  # even if interrupted (a notebook's stop button), D must not stay frozen
        D.requires_grad_(True)

    # D(x) and D(G(z)) as probabilities: at the equilibrium both are 0.5.
    return torch.stack([loss_D, loss_G, torch.sigmoid(real_logits).mean(),
                        torch.sigmoid(fake_logits).mean()]).detach()


class EMA:
    """An exponential moving average of G's weights (Karras et al., 2018; Yazici et al., 2019). It takes
    no part in the game: it is what we sample from, steadier than the last step's G in the oscillating game."""

    def __init__(self, G, decay=0.999):
        self.G, self.decay, self.steps = copy.deepcopy(G).requires_grad_(False), decay, 0

    @torch.no_grad()
    def update(self, G):
        self.steps += 1
        # Warm-up: early on, average over roughly the steps so far. A fixed 0.999 would still hold 63%
        # of the random initial weights after an epoch (468 steps), and 37% after 1,000.
        decay = min(self.decay, (1 + self.steps) / (10 + self.steps))
        # w_avg <- w_avg + (1 - decay) (w - w_avg): one fused call over all the weights, no loop per tensor
        torch._foreach_lerp_(list(self.G.parameters()), list(G.parameters()), 1 - decay)
        for averaged, live in zip(self.G.buffers(), G.buffers()):  # BatchNorm's running statistics:
            averaged.copy_(live)  # copied, not averaged


def to_unit_range(pixels):
    """uint8 pixels (N, 28, 28) in 0..255 -> floats (N, 1, 28, 28) in [-1, 1], the range of G's Tanh."""
    return pixels.float().div_(127.5).sub_(1.0).unsqueeze(1)


def train_epoch(G, D, opt_G, opt_D, pixels, batch_size, order=None, amp=False, ema=None):
    """One pass over `pixels`, the whole training set as one uint8 tensor (N, 28, 28) on the training
    device, in batches of the image indices in `order` (default: a fresh random permutation),
    updating the EMA of G after each step if one is given. It yields each step's [Loss_D, Loss_G,
    D(x), D(G(z))]; the caller decides when to log, save or stop."""
    if order is None:
        order = torch.randperm(len(pixels), device=pixels.device)
    # Full batches only, so every step has one shape. A batch is an index slice of a tensor already on
    # the device, scaled as it is drawn: no DataLoader, no per-image transforms.
    for start in range(0, len(order) - batch_size + 1, batch_size):
        real = to_unit_range(pixels[order[start:start + batch_size]])
        z = torch.randn(batch_size, G.latent_dim, device=pixels.device)
        stats = train_step(G, D, opt_G, opt_D, real, z, amp)
        if ema is not None:
            ema.update(G)
        yield stats


@torch.no_grad()  # no autograd bookkeeping while sampling
def sample(G, z):
    """G in eval mode: BatchNorm uses its running statistics, so an image depends on its own z alone."""
    was_training = G.training
    G.eval()
    images = G(z)
    G.train(was_training)
    return images


# =================================================================================================
# Above: the GAN. Below: the script around it.
# =================================================================================================

class GanError(Exception):
    """A refusal, shown as one line: exit code 2 for bad flags, 1 for anything else."""

    def __init__(self, message, code=1):
        super().__init__(message)
        self.code = code


# ---- Data: a torchvision dataset as one uint8 tensor -------------------------------------------

DATASETS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "kmnist": "KMNIST", "fake": None}
IDX_FILES = {"train-images-idx3-ubyte": 2051, "train-labels-idx1-ubyte": 2049,  # name: magic number
             "t10k-images-idx3-ubyte": 2051, "t10k-labels-idx1-ubyte": 2049}


def load_dataset(name, data_dir, train=True):
    """(images, labels) of one split: uint8 (N, 28, 28) and int64 (N,), read by torchvision's class."""
    if name == "fake":  # random pixels: the whole pipeline with no files at all
        generator = torch.Generator().manual_seed(0 if train else 1)
        n = 60_000 if train else 10_000
        return (torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=generator),
                torch.randint(0, 10, (n,), generator=generator))
    import torchvision  # imported here: generating from a checkpoint needs no dataset code

    dataset = getattr(torchvision.datasets, DATASETS[name])
    root = Path(data_dir)
    raw = root / dataset.__name__ / "raw"
    if root.is_file():
        raise GanError(f"--data-dir {root} is a file, not a folder")
    try:
        unpack_gz(raw)  # .gz files put there by hand or by a package (Debian's Fashion-MNIST)
        missing = [file for file in IDX_FILES if not (raw / file).exists()]
        if missing:
            refuse_misplaced_files(root, dataset.__name__)
            download(dataset, root, raw, missing)
        for file, magic in IDX_FILES.items():
            check_idx_file(raw / file, magic)
        data = dataset(root=str(root), train=train)
    except OSError as e:  # a folder we may not list or read
        raise GanError(f"cannot read {e.filename or root}: {e.strerror}; check --data-dir") from e
    return data.data, data.targets


def unpack_gz(raw):
    for file in IDX_FILES:
        packed, target, tmp = raw / f"{file}.gz", raw / file, raw / f"{file}.tmp"
        if packed.is_file() and not target.exists():
            try:
                with gzip.open(packed) as source, open(tmp, "wb") as destination:
                    shutil.copyfileobj(source, destination)
            except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
                tmp.unlink(missing_ok=True)
                raise GanError(f"cannot unpack {packed}: {e}; delete it and fetch it again") from e
            os.replace(tmp, target)


def refuse_misplaced_files(root, folder):
    """The likeliest offline mistake: --data-dir naming the raw/ folder itself, or the one above it."""
    for place in (root, root / "raw"):
        if all((place / file).exists() or (place / f"{file}.gz").exists() for file in IDX_FILES):
            right = place.parent.parent if place.name == "raw" and place.parent.name == folder else None
            fix = f"use --data-dir {right}" if right else f"move them to {root / folder / 'raw'}"
            raise GanError(f"the {folder} files are in {place}, but they belong in <data-dir>/{folder}/raw/: "
                           f"{fix}")


def download(dataset, root, raw, missing):
    """Let torchvision fetch the files; if it cannot, say what is missing and why, and leave no folders."""
    print(f"{dataset.__name__}: {', '.join(missing)} not in {raw}: downloading")
    existing, chatter = first_existing(raw), io.StringIO()
    try:
        with redirect_stdout(chatter):  # torchvision prints a line per mirror it tries: we want one
            dataset(root=str(root), train=True, download=True)
    except Exception as e:  # URLError, HTTPError, RuntimeError("Error downloading ...")
        remove_empty_folders(raw, existing)
        # The last mirror's complaint, such as "<urlopen error [Errno -2] Name or service not known>"
        complaints = re.findall(r"<urlopen error (?:\[Errno -?\d+\] )?(.*)>", chatter.getvalue() + str(e))
        reason = f"no network: {complaints[-1]}" if complaints else str(e).splitlines()[0]
        raise GanError(f"{dataset.__name__} is missing from {raw} ({', '.join(missing)}) and could not be "
                       f"downloaded ({reason}); put the files there, or point --data-dir at the folder "
                       f"that holds {dataset.__name__}/raw/") from e


def check_idx_file(path, magic):
    """Name a truncated or foreign file, where torchvision would fail with a bare AssertionError."""
    with open(path, "rb") as f:
        header = f.read(16 if magic == 2051 else 8)
    expected = len(header) + math.prod(int.from_bytes(header[i:i + 4], "big") for i in range(4, len(header), 4))
    if len(header) < 8 or int.from_bytes(header[:4], "big") != magic:
        problem = f"wrong magic number, expected {magic}"
    elif path.stat().st_size != expected:
        problem = f"{path.stat().st_size} bytes where its header promises {expected}"
    else:
        return
    raise GanError(f"{path} is truncated or not an MNIST-format file ({problem}); delete it and fetch it again")


def first_existing(path):
    return next(folder for folder in (path, *path.parents) if folder.exists())


def remove_empty_folders(path, keep):
    """Undo mkdir(parents=True): remove `path` and its parents below `keep` while they are empty."""
    while path != keep and path.is_dir() and not any(path.iterdir()):
        path.rmdir()
        path = path.parent


# ---- Checkpoints: the run, its folder, atomic saves and safe loads ------------------------------

FORMAT, FORMAT_VERSION = "vanilla_gan", 2  # written into every file we save, checked on load
# Flags about one invocation or one machine, not about the run: a checkpoint does not keep them. (The
# run's folder is where its checkpoint is, wherever it has been moved.)
INVOCATION_FLAGS = {"config", "max_steps", "resume", "debug", "generate", "checkpoint", "out", "nrow", "out_dir",
                    "device", "amp", "compile", "eval"}


@dataclass
class Run:
    """A training run: the networks, their optimisers and where training stands. The checkpoint holds
    all of it (and the random number generators' states), so a resumed run continues exactly."""
    G: Generator
    D: Discriminator
    opt_G: torch.optim.Optimizer
    opt_D: torch.optim.Optimizer
    ema: EMA  # the averaged G, or None (--ema-decay 0)
    fixed_noise: torch.Tensor  # the noise of every sample grid, so grids compare across epochs
    epoch: int = 0  # epochs completed
    batch: int = 0  # batches done in the epoch under way
    step: int = 0  # steps done in all (one D and one G update each)
    order: torch.Tensor = None  # the batch order of the epoch under way
    metrics: list = field(default_factory=list)  # one row per logged step
    quality: list = field(default_factory=list)  # one row per evaluation
    saved_step: int = None  # the step checkpoint.pt holds; None: nothing saved yet

    @property
    def sampler(self):
        """The generator the grids, generator.pt and the quality report use: the averaged one if any."""
        return self.ema.G if self.ema else self.G


RUN_FIELDS = ("epoch", "batch", "step", "order", "fixed_noise", "metrics", "quality")  # saved as they are


def new_run(args, device):
    torch.manual_seed(args.seed)  # seeding, in one place: weights, grid noise, batch orders, noise
    G = Generator(**generator_args(args)).to(device)
    D = Discriminator(args.d_hidden, args.d_dropout).to(device)
    opt_G, opt_D = (make_optimizer(net, args.lr, (args.beta1, args.beta2)) for net in (G, D))
    ema = EMA(G, args.ema_decay) if args.ema_decay else None
    return Run(G, D, opt_G, opt_D, ema, fixed_noise=torch.randn(64, args.latent_dim).to(device))


def generator_args(args):
    return {"latent_dim": args.latent_dim, "hidden": list(args.g_hidden), "activation": args.g_activation,
            "batchnorm": args.g_batchnorm}


def restore(args, device, checkpoint):
    """The run a checkpoint holds, on `device`; training flags typed now win over the saved ones."""
    run = new_run(args, device)
    run.G.load_state_dict(checkpoint["generator"])
    run.D.load_state_dict(checkpoint["discriminator"])
    if run.ema:
        run.ema.G.load_state_dict(checkpoint["generator_avg"])
        run.ema.steps = checkpoint["step"]  # one EMA update per step
    for optimizer, name in ((run.opt_G, "opt_G"), (run.opt_D, "opt_D")):
        optimizer.load_state_dict(checkpoint[name])
        for group in optimizer.param_groups:
            group["lr"], group["betas"] = args.lr, (args.beta1, args.beta2)
    for name in RUN_FIELDS:
        value = checkpoint[name]
        setattr(run, name, value.to(device) if isinstance(value, torch.Tensor) else value)
    torch.set_rng_state(checkpoint["rng"]["cpu"])
    if device.type == "cuda" and "cuda" in checkpoint["rng"]:
        torch.cuda.set_rng_state(checkpoint["rng"]["cuda"], device)
    run.saved_step = run.step
    return run


def file_header(kind, args=None):
    """Every file we save says what it is; a model file also says how to rebuild its generator."""
    header = {"format": FORMAT, "version": FORMAT_VERSION, "kind": kind}
    if args is not None:
        header.update(dataset=args.dataset, generator_args=generator_args(args))
    return header


def save_checkpoint(run_dir, args, run):
    rng = {"cpu": torch.get_rng_state()}
    if run.fixed_noise.device.type == "cuda":  # the training GPU's own generator, for dropout's masks
        rng["cuda"] = torch.cuda.get_rng_state(run.fixed_noise.device)
    flags = {name: value for name, value in vars(args).items() if name not in INVOCATION_FLAGS}
    networks = {"generator": run.G.state_dict(), "discriminator": run.D.state_dict(),
                "generator_avg": run.ema.G.state_dict() if run.ema else None,
                "opt_G": run.opt_G.state_dict(), "opt_D": run.opt_D.state_dict()}
    save_atomically({**file_header("checkpoint", args), "args": flags, "rng": rng, **networks,
                     **{name: getattr(run, name) for name in RUN_FIELDS}}, run_dir / "checkpoint.pt")
    run.saved_step = run.step
    save_atomically({**file_header("generator", args), "generator": run.sampler.state_dict()},
                    run_dir / "generator.pt")


@contextmanager
def atomic_file(path):
    """A binary file to write `path` through: a temporary file, flushed to disk, then renamed over
    `path`. A crash leaves the old file whole. Every file we write goes through here."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        if os.name == "posix":  # flush the folder too, so the rename itself survives a power loss
            folder = os.open(path.parent, os.O_RDONLY)
            os.fsync(folder)
            os.close(folder)
    except BaseException as e:  # a full disk, or a second Ctrl-C: drop the half-written file
        tmp.unlink(missing_ok=True)
        if not isinstance(e, OSError):
            raise
        reason = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise GanError(f"could not save {path}: {reason}; the previous {path.name} is intact") from e


def save_atomically(obj, path):
    with atomic_file(path) as f:
        torch.save(obj, f)


def load_file(path, device, kind=None):
    """One of our files, loaded with weights_only=True: a pickle that would build objects is refused."""
    path = Path(path)
    if path.is_dir():  # a run folder: its checkpoint, or for generating, its generator if that is all
        names = ["checkpoint.pt"] if kind == "checkpoint" else ["checkpoint.pt", "generator.pt"]
        path = next((path / name for name in names if (path / name).is_file()), path / names[0])
    if not path.is_file():
        raise GanError(f"no checkpoint at {path}")
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":  # torch.save writes a zip archive
            raise GanError(f"{path} is not a vanilla_gan checkpoint: it is not a file PyTorch wrote")
    try:
        data = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only met an object it will not build
        raise GanError(f"{path} is not a readable vanilla_gan checkpoint: it holds more than tensors and "
                       "plain data, and loading it could run code, so it was refused unread") from e
    except Exception as e:  # a truncated or damaged archive
        raise GanError(f"{path} is not a readable vanilla_gan checkpoint: it is truncated or damaged "
                       f"({e})") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise GanError(f"{path} is not a vanilla_gan checkpoint")
    if data.get("version") != FORMAT_VERSION:
        raise GanError(f"{path} was written by an incompatible version of this script "
                       f"(format {data.get('version')}, this script reads {FORMAT_VERSION})")
    if kind == "checkpoint" and data.get("kind") != kind:
        raise GanError(f"{path} holds a {data.get('kind')}, not a whole run; --resume needs the run's "
                       "checkpoint.pt")
    return path, data


@contextmanager
def run_folder(out_dir, resuming):
    """The run folder: created for a new run, and removed again if nothing was saved in it."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(out_dir or Path("runs") / stamp).resolve()
    for n in range(2, 100) if out_dir is None else ():  # two runs started in the same second
        if not run_dir.exists():
            break
        run_dir = run_dir.with_name(f"{stamp}-{n}")
    existing = first_existing(run_dir)
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise GanError(f"cannot write to the run folder {run_dir} ({existing} is not a writable folder); "
                       "choose another --out-dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = lock_run_folder(run_dir)
    try:
        if not resuming and (run_dir / "checkpoint.pt").exists():
            raise GanError(f"{run_dir} already holds a run; continue it with --resume {run_dir}, "
                           "or choose another --out-dir")
        yield run_dir
    finally:
        lock.close()  # releases the lock
        if [path.name for path in run_dir.iterdir()] == [".lock"]:  # nothing was saved: leave nothing behind
            (run_dir / ".lock").unlink()
        remove_empty_folders(run_dir, existing)


def lock_run_folder(run_dir):
    """One trainer per run folder: an OS lock on its .lock file, held while training. The OS releases it
    however the process ends, kill -9 included, so there is never a stale lock to delete by hand."""
    lock = open(run_dir / ".lock", "a+")
    lock.seek(0)
    try:
        if os.name == "nt":
            import msvcrt

            msvcrt.locking(lock.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        pid = lock.read().strip() or "unknown"
        lock.close()
        raise GanError(f"{run_dir} is in use by another process (PID {pid}) training there; wait for it to "
                       "finish or stop it, or choose another --out-dir") from None
    lock.truncate(0)
    lock.write(str(os.getpid()))  # for the message above, in the process that is refused
    lock.flush()
    return lock


# ---- Outputs: sample grids, CSV files, the loss plot --------------------------------------------

STATS = ("Loss_D", "Loss_G", "D(x)", "D(G(z))")
METRIC_FIELDS = ["epoch", "step", *STATS, "images_per_s"]
QUALITY_FIELDS = ["epoch", "step", "FID", "IS", "FID_real", "IS_real", "min_share",
                  *[f"share_{k}" for k in range(10)]]


def save_grid(images, path, nrow=8):
    from torchvision.utils import save_image

    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(images, path, nrow=nrow, normalize=True, value_range=(-1, 1))


def write_rows(path, fields, rows):
    """The whole CSV file, rewritten (atomically) with each checkpoint: it never holds steps the
    checkpoint lacks."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fields)
    writer.writeheader()
    writer.writerows(rows)
    with atomic_file(path) as f:
        f.write(text.getvalue().encode())


def plot_losses(rows, quality, steps_per_epoch, path):
    """The game at a glance: each curve faint, its moving average over it, the equilibrium dashed."""
    from matplotlib.figure import Figure  # the object API: no GUI backend, no global state

    panels = 3 if len(quality) > 1 else 2
    fig = Figure(figsize=(5 * panels, 4), layout="constrained")
    axes = fig.subplots(1, panels)
    epochs = [row["step"] / steps_per_epoch for row in rows]
    window = max(1, len(rows) // 25)  # the moving average spans a 25th of the run
    curves = ((axes[0], ("Loss_D", "Loss_G"), 2 * math.log(2)), (axes[1], ("D(x)", "D(G(z))"), 0.5))
    for ax, keys, equilibrium in curves:
        for key in keys if rows else ():
            values = torch.tensor([row[key] for row in rows])
            faint = ax.plot(epochs, values, alpha=0.25)[0]
            ax.plot(epochs[window - 1:], values.unfold(0, window, 1).mean(1), color=faint.get_color(), label=key)
        ax.axhline(equilibrium, color="gray", linestyle="--", label=f"equilibrium ({equilibrium:.2f})")
    axes[0].set(title="losses (Loss_D = 2 ln 2 when D can only guess)", xlabel="epoch")
    axes[1].set(title="D's mean output (0.5 when D can only guess)", xlabel="epoch", ylim=(0, 1))
    if panels == 3:
        quality_epochs = [row["step"] / steps_per_epoch for row in quality]
        axes[2].plot(quality_epochs, [row["FID"] for row in quality], "o-", label="samples")
        axes[2].axhline(quality[-1]["FID_real"], color="gray", linestyle="--", label="real data")
        axes[2].set(title="FID (lower is better)", xlabel="epoch")
    for ax in axes:
        ax.legend()
    fig.savefig(path, dpi=100)


def save_progress_gif(samples_dir):
    """Every epoch's grid as one animation (the whole run's, after a resume too), written atomically."""
    from PIL import Image

    frames = [Image.open(path) for path in sorted(samples_dir.glob("epoch_*.png"))]
    if frames:  # 0.2 s a frame, and the last one held for 2 s
        with atomic_file(samples_dir / "progress.gif") as f:
            frames[0].save(f, format="GIF", save_all=True, append_images=frames[1:], loop=0,
                           duration=[200] * (len(frames) - 1) + [2000])


# ---- The quality report: FID, Inception Score and class coverage, judged by a small classifier ---

CLASSIFIER_VERSION = 2  # part of the cache's file name: bump it when the classifier changes


class Classifier(nn.Module):
    """A small CNN. Its 128 penultimate features are the space FID is measured in, the role
    Inception-v3 plays for photographs."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 7 * 7, 128), nn.ReLU())
        self.head = nn.Linear(128, 10)

    def forward(self, images):
        return self.head(self.features(images))


def train_classifier(images, labels, device, epochs=3, batch_size=128):
    """Under a minute on a 2-core CPU for MNIST (25 s with bf16 instructions, 57 s without), ~99% accuracy."""
    model = Classifier().to(device)
    optimizer = torch.optim.Adam(model.parameters(), fused=device.type in ("cpu", "cuda"))
    # one-cycle: warm up to 3e-3, then anneal; 99% in a few epochs where a fixed rate needs more
    steps = epochs * math.ceil(len(images) / batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    images, labels, amp = images.to(device), labels.to(device), amp_by_default(device)
    for _ in range(epochs):
        for index in torch.randperm(len(images), device=device).split(batch_size):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):  # where it is faster
                logits = model(to_unit_range(images[index])).float()
            loss = nn.functional.cross_entropy(logits, labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def load_classifier(dataset, train_set, test_set, device):
    """The classifier for this data: from the cache (~/.cache/vanilla-gan), or trained now and cached."""
    fingerprint = hashlib.sha1(test_set[0].numpy().tobytes()).hexdigest()[:12]  # the cache follows the data
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vanilla-gan"
    path = cache / f"classifier-v{CLASSIFIER_VERSION}-{dataset}-{fingerprint}.pt"
    model = Classifier().to(device)
    try:
        saved = load_file(path, device)[1]
        model.load_state_dict(saved["classifier"])
        print(f"classifier {path}: {saved['accuracy']:.2%} test accuracy")
        return model.eval()
    except (GanError, KeyError, RuntimeError):  # not cached yet, or damaged: train one
        pass
    print("training a classifier for the quality report (under a minute on a 2-core CPU, once)", flush=True)
    model = train_classifier(*train_set, device)
    accuracy = (predict(model, test_set[0])[1].argmax(1).cpu() == test_set[1]).double().mean().item()
    print(f"classifier trained: {accuracy:.2%} test accuracy")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        saved = {**file_header("classifier"), "accuracy": accuracy, "classifier": model.state_dict()}
        save_atomically(saved, path)
    except (OSError, GanError) as e:
        print(f"warning: the classifier could not be cached ({e}); it will be trained again next time")
    return model


@torch.inference_mode()
def predict(classifier, images, batch_size=250):
    """Penultimate features (float64) and class probabilities of uint8 or [-1, 1] images."""
    features, probs = [], []
    device = next(classifier.parameters()).device
    for batch in images.split(batch_size):  # small batches: the conv activations stay in cache
        batch = batch.to(device)
        f = classifier.features(to_unit_range(batch) if batch.dtype == torch.uint8 else batch)
        features.append(f.double())
        probs.append(classifier.head(f).softmax(1).double())
    return torch.cat(features), torch.cat(probs)


def frechet_distance(features_a, features_b):
    """FID: fit a Gaussian to each set of features; ||mu_a - mu_b||^2 + Tr(C_a + C_b - 2 (C_a C_b)^(1/2))."""
    mu_a, mu_b = features_a.mean(0), features_b.mean(0)
    cov_a, cov_b = torch.atleast_2d(torch.cov(features_a.T)), torch.atleast_2d(torch.cov(features_b.T))
    # Tr((C_a C_b)^(1/2)) is the sum of the square roots of C_a C_b's eigenvalues, real and >= 0 in
    # exact arithmetic; .real drops the tiny imaginary parts that rounding leaves.
    cross = torch.linalg.eigvals(cov_a @ cov_b).sqrt().real.sum()
    return ((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross).item()


def inception_score(probs):
    """exp(E_x KL(p(y|x) || p(y))): high when each sample is clearly one class and all classes appear."""
    marginal = probs.mean(0, keepdim=True)
    return (probs * (probs.clamp(min=1e-12).log() - marginal.clamp(min=1e-12).log())).sum(1).mean().exp().item()


class QualityJudge:
    """Built once per run: the classifier, the test set's features and real data's reference scores."""

    def __init__(self, dataset, data_dir, device, samples=10_000):
        self.samples = samples  # generated images per evaluation, against up to 10,000 test images
        train_set = load_dataset(dataset, data_dir, train=True)
        test_set = load_dataset(dataset, data_dir, train=False)
        with torch.random.fork_rng():  # training the classifier must not shift the GAN's random numbers
            torch.manual_seed(0)
            self.classifier = load_classifier(dataset, train_set, test_set, device)
        self.test_features = predict(self.classifier, test_set[0][:10_000])[0]
        features, probs = predict(self.classifier, train_set[0][:10_000])
        self.reference = {"FID_real": frechet_distance(features, self.test_features),
                          "IS_real": inception_score(probs)}

    def __call__(self, G, epoch=None, step=None, name=""):
        z = torch.randn(self.samples, G.latent_dim, generator=torch.Generator().manual_seed(0))
        images = torch.cat([sample(G, chunk.to(next(G.parameters()).device)) for chunk in z.split(1000)])
        features, probs = predict(self.classifier, images)
        shares = (torch.bincount(probs.argmax(1), minlength=10).double() / len(probs)).tolist()
        row = {"epoch": epoch, "step": step, "FID": frechet_distance(features, self.test_features),
               "IS": inception_score(probs), **self.reference, "min_share": min(shares),
               **{f"share_{k}": share for k, share in enumerate(shares)}}
        print(f"quality{name}{'' if step is None else f' at step {step}'}: FID {row['FID']:.2f} (real data "
              f"{row['FID_real']:.2f})  IS {row['IS']:.2f} (real data {row['IS_real']:.2f})  rarest class "
              f"{shares.index(min(shares))} at {min(shares):.1%} of samples", flush=True)
        rare = [str(k) for k, share in enumerate(shares) if share < 0.05]
        if rare:
            many = len(rare) > 1
            print(f"warning: class{'es' * many} {', '.join(rare)} under 5% of samples: the generator is dropping "
                  f"{'them' if many else 'it'} (mode collapse)", flush=True)
        return row


# ---- The command line -------------------------------------------------------------------------

# The classic tutorials' networks, one flag each: --config NAME. Flags typed beside it still win.
CONFIGS = {
    "default": {},  # the flags' own defaults
    "minimal": {"g_hidden": [128], "g_activation": "relu", "d_hidden": [128], "d_dropout": 0.0, "batch_size": 64,
                "epochs": 100},
    "deep": {"g_hidden": [256, 512, 1024], "g_activation": "relu", "d_hidden": [1024, 512, 256], "d_dropout": 0.0,
             "epochs": 20},
    "batchnorm": {"g_hidden": [128, 256, 512, 1024], "g_activation": "relu", "g_batchnorm": True,
                  "d_hidden": [1024, 512, 256], "d_dropout": 0.0, "latent_dim": 64, "lr": 1e-5, "epochs": 500},
}
# A resumed run keeps the flags that shape its model and its batch order.
RUN_IDENTITY = ("dataset", "latent_dim", "g_hidden", "d_hidden", "g_activation", "g_batchnorm", "d_dropout",
                "ema_decay", "batch_size", "seed")
GENERATE_FLAGS = {"generate", "checkpoint", "out", "nrow", "seed", "device", "debug", "eval", "data_dir"}
MAX_GRID_IMAGES = 10_000  # a 100 x 100 grid is a 3002 x 3002 picture; more images belong in a .pt file


def checked(cast, is_valid, expected):
    """An argparse type: convert the text with `cast`, refuse values that are not `is_valid`."""
    def parse(text):
        try:
            value = cast(text)
            if is_valid(value):
                return value
        except ValueError:
            pass
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return parse


positive_int = checked(int, lambda v: v > 0, "a positive whole number")
non_negative_int = checked(int, lambda v: v >= 0, "a whole number >= 0")
positive_float = checked(float, lambda v: 0 < v < math.inf, "a positive number")  # refuses nan too
unit_interval = checked(float, lambda v: 0 <= v < 1, "a number in [0, 1)")
device_name = checked(str, lambda v: re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v),
                      "auto, cpu, cuda, cuda:N or mps")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Print each flag's default, except where the help text itself says what happens without it."""

    def _get_help_string(self, action):
        return action.help if action.default in (None, False) else super()._get_help_string(action)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag gets one line (with a guess at a typo) instead of the usage block."""

    def error(self, message):
        unknown = re.match(r"unrecognized arguments: (--[^\s=]+)", message)
        known = [option for action in self._actions for option in action.option_strings]
        guess = difflib.get_close_matches(unknown[1], known, n=1) if unknown else []
        raise GanError(message + (f"; did you mean {guess[0]}?" if guess else "") + " (see --help)", code=2)


def build_parser():
    p = OneLineParser(description="Train a vanilla GAN on MNIST, resume a run, or generate digits from one.",
                      formatter_class=HelpFormatter, allow_abbrev=False)
    run = p.add_argument_group("run")
    run.add_argument("--config", choices=list(CONFIGS),
                     help="a classic tutorial's network, batch size, epochs and lr; flags typed beside it win")
    run.add_argument("--epochs", type=positive_int, default=50, help="passes over the training set")
    run.add_argument("--max-steps", type=positive_int, help="stop this invocation at this many steps in all")
    run.add_argument("--device", type=device_name, default="auto", help="auto picks cuda, then mps, then cpu")
    run.add_argument("--seed", type=int, default=42, help="seed for weights, noise and batch order")
    run.add_argument("--amp", action=argparse.BooleanOptionalAction,
                     help="bfloat16 autocast (default: on for CPUs with bf16 instructions, measured faster)")
    run.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                     help="torch.compile both networks (off: on a 2-core CPU it compiled 35 s, then ran slower)")
    run.add_argument("--debug", action="store_true", help="show Python tracebacks instead of one-line errors")
    data = p.add_argument_group("data")
    data.add_argument("--dataset", choices=list(DATASETS), default="mnist", help="fake: random images, no files")
    data.add_argument("--data-dir", default="data",
                      help="the folder that holds MNIST/raw/ (downloaded there if missing)")
    model = p.add_argument_group("model")
    model.add_argument("--latent-dim", type=positive_int, default=100, help="size of the noise vector z")
    model.add_argument("--g-hidden", type=positive_int, nargs="+", default=[256, 512], help="G's hidden widths")
    model.add_argument("--d-hidden", type=positive_int, nargs="+", default=[512, 256], help="D's hidden widths")
    model.add_argument("--g-activation", choices=list(ACTIVATIONS), default="leakyrelu",
                       help="G's hidden activation")
    model.add_argument("--g-batchnorm", action="store_true", help="BatchNorm1d after each hidden Linear of G")
    model.add_argument("--d-dropout", type=unit_interval, default=0.4,
                       help="Dropout after each hidden layer of D (0: none)")
    model.add_argument("--ema-decay", type=unit_interval, default=0.999,
                       help="sample from an average of G's weights with this decay (0: from G itself)")
    optim = p.add_argument_group("optimisation")
    optim.add_argument("--batch-size", type=positive_int, default=128, help="real images per step")
    optim.add_argument("--lr", type=positive_float, default=2e-4, help="Adam learning rate, both networks")
    optim.add_argument("--beta1", type=unit_interval, default=0.5, help="Adam beta1, both networks")
    optim.add_argument("--beta2", type=unit_interval, default=0.999, help="Adam beta2, both networks")
    out = p.add_argument_group("output")
    out.add_argument("--out-dir", help="run folder (default: runs/<date-time>, a new one)")
    out.add_argument("--log-every", type=positive_int, default=100, help="print and record every N steps")
    out.add_argument("--sample-every", type=non_negative_int, default=0,
                     help="also save a sample grid every N steps (0: only when an epoch completes)")
    out.add_argument("--eval", action="store_true", help="after training: FID, Inception Score, class coverage")
    out.add_argument("--eval-every", type=non_negative_int, default=0, metavar="K", help="also every K epochs")
    out.add_argument("--resume", metavar="PATH", help="continue the run in this run folder or checkpoint.pt")
    gen = p.add_argument_group("generation (no training)")
    gen.add_argument("--generate", type=positive_int, metavar="N", help="generate N images from --checkpoint")
    gen.add_argument("--checkpoint", help="a run folder, or its generator.pt or checkpoint.pt")
    gen.add_argument("--out", help="a .png (or .jpg, ...) grid, or a .pt tensor (default: generated.png beside "
                                   "the checkpoint)")
    gen.add_argument("--nrow", type=positive_int, default=8, help="images per row in the grid")
    return p


def parse_args(argv):
    """The flags' defaults, overridden by the resumed run's flags, then by --config, then by the flags
    typed. Returns (args, the checkpoint to resume or None)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    checkpoint = None
    if args.resume:
        path, checkpoint = load_file(args.resume, "cpu", kind="checkpoint")
        parser.set_defaults(**{**checkpoint["args"], "out_dir": str(path.parent.resolve())})
    parser.set_defaults(**CONFIGS.get(args.config, {}))
    args = parser.parse_args(argv)
    if checkpoint:
        saved = checkpoint["args"]
        changed = [f"--{name.replace('_', '-')}" for name in RUN_IDENTITY if getattr(args, name) != saved[name]]
        if changed:
            many = len(changed) > 1
            flags, drop = ", ".join(changed), "them" if many else "it"
            if args.config:
                flags, drop = f"--config {args.config} sets {flags}, which", "it"
            raise GanError(f"{flags} {'differ' if many else 'differs'} from the checkpoint's; a resumed run "
                           f"keeps its model, data and batch order: drop {drop}, or start a new run", code=2)
        if Path(args.out_dir).resolve() != path.parent.resolve():
            raise GanError(f"--out-dir differs from the resumed run's folder {path.parent.resolve()}; drop it",
                           code=2)
    typed = [name for name in vars(args) if getattr(args, name) != parser.get_default(name)]
    stray = [name for name in typed if name not in GENERATE_FLAGS] if args.generate else \
            [name for name in typed if name in ("checkpoint", "out", "nrow")]
    if stray:
        flag = f"--{stray[0].replace('_', '-')}"
        raise GanError(f"{flag} does not apply to --generate (the checkpoint defines the model)" if args.generate
                       else f"{flag} only works with --generate", code=2)
    if args.generate and args.checkpoint is None:
        raise GanError("--generate needs --checkpoint PATH (a run folder, generator.pt or checkpoint.pt)", code=2)
    if args.dataset == "fake" and (args.eval or args.eval_every):
        raise GanError("no quality report exists for random data (--dataset fake): drop --eval and --eval-every",
                       code=2)
    return args, checkpoint


def pick_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else
                            "mps" if torch.backends.mps.is_available() else "cpu")
    device, found = torch.device(name), torch.cuda.device_count()
    if device.type == "cuda" and (device.index or 0) >= found:
        raise GanError(f"--device {name}: " + (f"only {found} CUDA device(s) here" if found else
                                               "no CUDA GPU is available here (try --device cpu)"))
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise GanError(f"--device {name}: Apple's MPS backend is not available here (try --device cpu)")
    return device


def amp_by_default(device):
    """bfloat16 autocast is on where it was measured faster: CPUs with bf16 instructions (AVX512-BF16:
    6.0 s instead of 9.2 s an epoch on 2 cores). Elsewhere it is yours to try with --amp."""
    cpuinfo = Path("/proc/cpuinfo")  # Linux only
    has_bf16 = cpuinfo.exists() and re.search(r"avx512_bf16|amx_bf16", cpuinfo.read_text()) is not None
    return device.type == "cpu" and has_bf16


# ---- main: train, generate, one-line errors -----------------------------------------------------

Clock = namedtuple("Clock", "time step")  # a moment of the run, to measure images per second from
DIVERGED = 100.0  # a BCE loss this large means logits beyond +-100: D's sigmoid is saturated for good
DEVICE_CHECK_STEPS = 20  # steps the device check runs on the device and on the CPU
# Float32 sums taken in another order differ by about 1e-7 relative; 20 steps of the game, and Adam's
# normalised updates where a gradient is near 0, grow that to about 1e-5. A wrong kernel errs by ~1.
DEVICE_TOLERANCE = 1e-3  # the device check's bound on the relative difference from the CPU


class StopRequest:
    """Ctrl-C / SIGTERM: finish the current step, save, exit. A second Ctrl-C stops at once."""

    def __enter__(self):
        self.signal = None
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum
        print(f"\n{signal.Signals(signum).name} received: finishing this step and saving a checkpoint "
              "(Ctrl-C again to abort without saving)", flush=True)

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def device_check(args, device, steps=DEVICE_CHECK_STEPS):
    """--dataset fake on a GPU: does it compute what the CPU computes? The same steps, from the same weights
    and inputs, run on both in plain float32 (no autocast, no TF32). Returns (the largest relative difference
    of the losses and the weights, the CPU's images per second); a difference above DEVICE_TOLERANCE stops."""
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # TF32 off, for this comparison only
    try:
        with torch.random.fork_rng(devices=[]):  # the run's own random numbers stay untouched
            torch.manual_seed(args.seed)
            # Every random input is drawn once, on the CPU; dropout, whose masks are random, is off.
            nets = Generator(**generator_args(args)), Discriminator(args.d_hidden, dropout=0)
            pixels = load_dataset("fake", None)[0]
            batches = torch.randint(len(pixels), (steps, args.batch_size))  # image indices, step by step
            z = torch.randn(steps, args.batch_size, args.latent_dim)
            results = [run_steps(nets, pixels[batches], z, args, where)
                       for where in (device, torch.device("cpu"))]
    finally:
        torch.set_float32_matmul_precision(precision)
    (on_device, _), (on_cpu, seconds) = results
    differences = {name: relative_difference(on_device[name], value) for name, value in on_cpu.items()}
    worst = max(differences, key=differences.get)
    if not differences[worst] <= DEVICE_TOLERANCE:  # NaN fails too
        raise GanError(f"device check failed: {worst} on {device} differs from the CPU's by "
                       f"{differences[worst]:.1e} (relative; the tolerance is {DEVICE_TOLERANCE:g}): this "
                       "device, its driver or this PyTorch build computes wrongly")
    return differences[worst], steps * args.batch_size / seconds


def relative_difference(a, b):
    """||a - b|| / ||b|| in float64 (integer buffers such as BatchNorm's step count included)."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp(min=1e-12)).item()


def run_steps(nets, batches, z, args, device):
    """Train copies of `nets` on `device` on the uint8 batches (steps, batch size, 28, 28) with the noise
    z. Returns ({name: tensor} of the losses and every weight afterwards, on the CPU; the seconds the
    steps took)."""
    G, D = (copy.deepcopy(net).to(device) for net in nets)
    opt_G, opt_D = (make_optimizer(net, args.lr, (args.beta1, args.beta2)) for net in (G, D))
    start, stats = time.perf_counter(), []
    for batch, noise in zip(batches, z):
        stats.append(train_step(G, D, opt_G, opt_D, to_unit_range(batch.to(device)), noise.to(device)))
    results = {"the losses": torch.stack(stats).cpu()}  # .cpu() waits for the device: the timing is complete
    seconds = time.perf_counter() - start
    for net in (G, D):
        prefix = f"{type(net).__name__}'s"
        results.update({f"{prefix} {name}": value.cpu() for name, value in net.state_dict().items()})
    return results, seconds


def train(args, run_dir, device, checkpoint):
    """Train to --epochs or --max-steps, or until a stop request. Returns (exit code, run)."""
    pixels = load_dataset(args.dataset, args.data_dir)[0].to(device)  # resident: see train_epoch
    if args.batch_size > len(pixels):
        raise GanError(f"--batch-size {args.batch_size} is larger than the dataset ({len(pixels)} images)",
                       code=2)
    steps_per_epoch = len(pixels) // args.batch_size
    last_step = min(args.max_steps or math.inf, args.epochs * steps_per_epoch)
    run = restore(args, device, checkpoint) if checkpoint else new_run(args, device)
    if run.step >= last_step:
        print(f"nothing to do: the run already has {run.step} steps ({run.epoch} epochs); "
              "pass a larger --epochs or --max-steps to train on")
        return 0, None
    judge = QualityJudge(args.dataset, args.data_dir, device) if args.eval or args.eval_every else None
    print_banner(args, device, run_dir, len(pixels), run)
    checked_device = None
    if args.dataset == "fake" and device.type == "cpu":
        print("device check: on the CPU there is nothing to compare against; training on random images")
    elif args.dataset == "fake":
        checked_device = device_check(args, device)
        print(f"device check: {device} matches the CPU to {checked_device[0]:.0e} over {DEVICE_CHECK_STEPS} steps; training on")
    # Compiled wrappers train; G and D themselves are saved, so their state_dict keys stay plain.
    G, D = (torch.compile(run.G), torch.compile(run.D)) if args.compile else (run.G, run.D)
    start = logged = Clock(time.perf_counter(), run.step)
    try:
        with StopRequest() as stop:
            while run.step < last_step and stop.signal is None:
                if run.batch == 0:  # a fresh batch order each epoch; a resumed epoch keeps its own
                    run.order = torch.randperm(len(pixels), device=device)
                sums, first_step, epoch_start = torch.zeros(4, device=device), run.step, time.perf_counter()
                rest_of_epoch = run.order[run.batch * args.batch_size:]  # all of it, unless resumed mid-epoch
                for stats in train_epoch(G, D, run.opt_G, run.opt_D, pixels, args.batch_size, rest_of_epoch,
                                         args.amp, run.ema):
                    sums += stats  # summed on the device: no host sync on steps that do not log
                    run.batch += 1
                    run.step += 1
                    if run.step % args.log_every == 0:  # .tolist() waits for the device: only here
                        logged = log_step(run, args, steps_per_epoch, stats.tolist(), logged)
                    if args.sample_every and run.step % args.sample_every == 0:
                        grid = run_dir / "samples" / f"step_{run.step:07d}.png"
                        save_grid(sample(run.sampler, run.fixed_noise), grid)
                    if run.step >= last_step or stop.signal is not None:
                        break
                means = (sums / (run.step - first_step)).tolist()  # one sync per epoch
                check_sane(dict(zip(STATS, means)), run, run.G, run.D)  # before a save could overwrite good files
                completed = run.batch == steps_per_epoch
                if completed:
                    run.epoch, run.batch = run.epoch + 1, 0
                eta = (time.perf_counter() - start.time) / (run.step - start.step) * (last_step - run.step)
                epoch, status = (run.epoch, "done") if completed else (run.epoch + 1, "stopped early")
                print(f"epoch {epoch}/{args.epochs} {status}: mean {format_stats(means)}  "
                      f"{time.perf_counter() - epoch_start:.1f}s ({run.step - first_step} steps)  "
                      f"ETA {datetime.timedelta(seconds=round(eta))}", flush=True)
                save_progress(run, args, run_dir, judge, completed, last=run.step >= last_step)
    except KeyboardInterrupt:  # the second Ctrl-C
        saved = ("nothing was saved" if run.saved_step is None else
                 f"the checkpoint holds step {run.saved_step}; to resume: {resume_command(run_dir)}")
        raise GanError(f"aborted at step {run.step}: {saved}", code=130) from None
    if checked_device and not stop.signal:
        rate = (run.step - start.step) * args.batch_size / (time.perf_counter() - start.time)
        print(f"device check passed: {device} ({device_label(device)}) matches the CPU to "
              f"{checked_device[0]:.0e}; {rate:,.0f} img/s, {rate / checked_device[1]:.0f}x this CPU")
    del pixels  # on a CPU, freed before matplotlib loads, which reuses that memory: no higher peak
    plot_losses(run.metrics, run.quality, steps_per_epoch, run_dir / "losses.png")
    save_progress_gif(run_dir / "samples")
    return (128 + stop.signal if stop.signal else 0), run  # 130 for SIGINT, 143 for SIGTERM


def save_progress(run, args, run_dir, judge, completed, last):
    """After an epoch, or the part of one before a stop: the epoch's grid, an evaluation if due, the
    checkpoint and the CSV files."""
    if completed:
        save_grid(sample(run.sampler, run.fixed_noise), run_dir / "samples" / f"epoch_{run.epoch:03d}.png")
    if judge and (args.eval_every and completed and run.epoch % args.eval_every == 0 or args.eval and last):
        run.quality.append(judge(run.sampler, run.epoch, run.step, " of the averaged G" if run.ema else ""))
        if run.ema and args.eval and last:  # once, to show what averaging buys
            judge(run.G, run.epoch, run.step, " of the last G, not averaged")
    save_checkpoint(run_dir, args, run)
    write_rows(run_dir / "metrics.csv", METRIC_FIELDS, run.metrics)
    if run.quality:
        write_rows(run_dir / "quality.csv", QUALITY_FIELDS, run.quality)


def log_step(run, args, steps_per_epoch, stats, logged):
    """The monitoring line, and its row for metrics.csv. Returns the Clock of this log."""
    now = time.perf_counter()
    rate = (run.step - logged.step) * args.batch_size / (now - logged.time)
    check_sane(dict(zip(STATS[:2], stats[:2])), run)
    run.metrics.append({"epoch": run.epoch + 1, "step": run.step, **dict(zip(STATS, stats)),
                        "images_per_s": rate})
    print(f"[{run.epoch + 1}/{args.epochs}][{run.batch}/{steps_per_epoch}] step {run.step}  "
          f"{format_stats(stats)}  {rate:,.0f} img/s", flush=True)
    return Clock(now, run.step)


def format_stats(stats):
    return "  ".join(f"{name} {value:.4f}" for name, value in zip(STATS, stats))


def check_sane(losses, run, *nets):
    """Stop a diverged run before it saves anything: the last good checkpoint stays as it was."""
    bad = [f"{name} {value:.3g}" for name, value in losses.items() if not abs(value) < DIVERGED]  # NaN too
    bad += [f"{type(net).__name__}'s weights" for net in nets
            if not all(p.isfinite().all() for p in net.parameters())]
    if bad:
        saved = ("nothing was saved" if run.saved_step is None else
                 f"the checkpoint still holds step {run.saved_step}")
        raise GanError(f"training diverged at step {run.step}: {', '.join(bad)} (a loss above {DIVERGED:g}, "
                       f"NaN or infinite); stopped, {saved} (try a smaller --lr)")


def print_banner(args, device, run_dir, n_images, run):
    gpu = f" ({device_label(device)}, CUDA {torch.version.cuda})" if device.type == "cuda" else ""
    sizes = [f"{sum(p.numel() for p in net.parameters()):,}" for net in (run.G, run.D)]
    print(f"device {device}{gpu}  torch {torch.__version__}  amp {args.amp}  compile {args.compile}\n"
          f"dataset {args.dataset}: {n_images} training images "
          f"({'random' if args.dataset == 'fake' else args.data_dir})\n"
          f"Generator {sizes[0]} parameters, Discriminator {sizes[1]} parameters\n"
          f"seed {args.seed}  batch {args.batch_size}  lr {args.lr}  betas ({args.beta1}, {args.beta2})\n"
          f"run folder {run_dir}" + (f", resuming at step {run.step}" if run.step else ""), flush=True)


def device_label(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type.upper()


def resume_command(run_dir):
    return shlex.join([sys.executable, str(Path(__file__).resolve()), "--resume", str(run_dir)])


def train_command(args, checkpoint):
    device = pick_device(args.device)
    args.amp = amp_by_default(device) if args.amp is None else args.amp
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 tensor cores for the float32 products
    args.data_dir = str(Path(args.data_dir).resolve())  # absolute: a resumed run may start elsewhere
    with run_folder(args.out_dir, resuming=checkpoint is not None) as run_dir:
        args.out_dir = str(run_dir)
        code, run = train(args, run_dir, device, checkpoint)
    if run is None:  # nothing to do
        return code
    if code:
        print(f"stopped at step {run.step}; checkpoint saved. To resume:\n  {resume_command(run_dir)}")
    else:
        print(f"done: {run.step} steps. Outputs in {run_dir}")
    return code


def generate(args):
    device = pick_device(args.device)
    out = output_file(args)  # refused before any work
    path, saved = load_file(args.checkpoint, device)
    try:
        G = Generator(**saved["generator_args"]).to(device)
        G.load_state_dict(saved.get("generator_avg") or saved["generator"])  # the averaged G, if any
    except (KeyError, TypeError, RuntimeError) as e:
        raise GanError(f"{path} does not hold a generator this script can rebuild ({e})") from e
    if args.eval and saved["dataset"] == "fake":
        raise GanError(f"{path} was trained on random data (--dataset fake): no quality report exists for it")
    torch.manual_seed(args.seed)
    images = torch.empty(args.generate, *IMAGE_SHAPE)
    for chunk in images.split(10_000):  # a chunk at a time: memory is the output plus one chunk
        chunk.copy_(sample(G, torch.randn(len(chunk), G.latent_dim, device=device)))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.suffix == ".pt":
            save_atomically(images, out)
        else:
            save_grid(images, out, nrow=args.nrow)
    except OSError as e:
        raise GanError(f"cannot write {out}: {e.strerror or e}") from e
    print(f"wrote {args.generate} images to {out.resolve()}")
    if args.eval:
        QualityJudge(saved["dataset"], args.data_dir, device)(G)
    return 0


def output_file(args):
    """Where --generate writes: refused at once if it can be neither a .pt tensor nor a picture."""
    given = Path(args.checkpoint)
    out = Path(args.out) if args.out else (given if given.is_dir() else given.parent) / "generated.png"
    if out.is_dir():
        raise GanError(f"--out {out} is a folder; give a file name, such as {out / 'digits.png'}")
    if out.suffix != ".pt":
        from PIL import Image

        if Image.registered_extensions().get(out.suffix.lower()) not in Image.SAVE:
            what = f"has an extension Pillow cannot write ({out.suffix})" if out.suffix else "has no extension"
            raise GanError(f"--out {out} {what}: end it in .png (a grid; .jpg and the other image types Pillow "
                           "writes work too) or .pt (a tensor)")
        if args.generate > MAX_GRID_IMAGES:
            raise GanError(f"--generate {args.generate} is too many images for one picture (at most "
                           f"{MAX_GRID_IMAGES:,}); write them to a .pt file instead")
    return out


def main(argv=None):
    """The command line; from Python, main(["--epochs", "1"]) runs it and returns the exit code."""
    argv = sys.argv[1:] if argv is None else [str(arg) for arg in argv]
    try:
        args, checkpoint = parse_args(argv)
        return generate(args) if args.generate else train_command(args, checkpoint)
    except SystemExit as e:  # --help: argparse's exit becomes a return value
        return e.code
    except KeyboardInterrupt:  # Ctrl-C before training started, or after it ended
        print("aborted; files already saved are intact", file=sys.stderr)
        return 130
    except GanError as e:
        if "--debug" in argv:
            raise
        print(f"vanilla_gan.py: error: {e}", file=sys.stderr)
        return e.code
    except Exception as e:  # nothing we foresaw: still one line, the traceback on request
        if "--debug" in argv:
            raise
        print(f"vanilla_gan.py: error: {type(e).__name__}: {e} (run again with --debug to see where)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

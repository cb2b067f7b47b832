"""The textbook GAN training loop, for timing against vanilla_gan.py.

Same model, data and hyperparameters as vanilla_gan.py, written the way a typical
tutorial writes it: per-image transforms in a DataLoader, a Sigmoid on D with BCELoss,
and a fresh batch of fakes for G's step (three D passes and two G passes a step).

    python bench/textbook.py --epochs 3 --data-dir data
"""
import argparse
import time

import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

LATENT_DIM = 100


def make_generator():
    return nn.Sequential(
        nn.Linear(LATENT_DIM, 256),
        nn.LeakyReLU(0.2),
        nn.Linear(256, 512),
        nn.LeakyReLU(0.2),
        nn.Linear(512, 1024),
        nn.LeakyReLU(0.2),
        nn.Linear(1024, 784),
        nn.Tanh(),
        # (N, 784) -> (N, 1, 28, 28), the shape of the real batch
        nn.Unflatten(1, (1, 28, 28)),
    )


def make_discriminator():
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 512),
        nn.LeakyReLU(0.2),
        nn.Dropout(0.3),
        nn.Linear(512, 256),
        nn.LeakyReLU(0.2),
        nn.Dropout(0.3),
        nn.Linear(256, 1),
        nn.Sigmoid(),
    )


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--batch-size", type=int, default=128)
    default_device = "cpu"
    if torch.cuda.is_available():
        default_device = "cuda"
    parser.add_argument("--device", default=default_device)
    parser.add_argument("--seed", type=int, default=42)
    return parser.parse_args()


def main():
    args = parse_args()
    torch.manual_seed(args.seed)
    device = torch.device(args.device)

    # Per-image transforms: each image is converted and scaled to [-1, 1] on every visit
    transform = transforms.Compose([
        transforms.ToTensor(),
        transforms.Normalize((0.5,), (0.5,)),
    ])
    dataset = datasets.MNIST(args.data_dir, train=True, download=True, transform=transform)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True)

    generator = make_generator().to(device)
    discriminator = make_discriminator().to(device)
    opt_g = torch.optim.Adam(generator.parameters(), lr=3e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=3e-4, betas=(0.5, 0.999))
    criterion = nn.BCELoss()

    total_start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        epoch_start = time.perf_counter()
        for real, _ in loader:
            real = real.to(device)
            n = real.size(0)
            ones = torch.ones(n, 1, device=device)
            zeros = torch.zeros(n, 1, device=device)

            # D: real batch labelled ones, fakes labelled zeros.
            # detach(): D's step must not compute gradients for G.
            z = torch.randn(n, LATENT_DIM, device=device)
            fake = generator(z)
            loss_real = criterion(discriminator(real), ones)
            loss_fake = criterion(discriminator(fake.detach()), zeros)
            loss_d = loss_real + loss_fake
            opt_d.zero_grad()
            loss_d.backward()
            opt_d.step()

            # G: new fakes from fresh noise, which G wants D to call real
            z2 = torch.randn(n, LATENT_DIM, device=device)
            loss_g = criterion(discriminator(generator(z2)), ones)
            opt_g.zero_grad()
            loss_g.backward()
            opt_g.step()

        # .item() waits for the device, so the epoch time includes all its work
        d_value = loss_d.item()
        g_value = loss_g.item()
        seconds = time.perf_counter() - epoch_start
        print(f"epoch {epoch}/{args.epochs}  loss_d {d_value:.4f}  loss_g {g_value:.4f}"
              f"  {seconds:.1f}s", flush=True)
    total = time.perf_counter() - total_start
    print(f"total {total:.1f}s for {args.epochs} epoch(s)", flush=True)


if __name__ == "__main__":
    main()

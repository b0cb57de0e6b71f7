"""Sample ref-dit's 2-step student on a fractional "1.67-step" schedule, unrolled into one graph.

Run: python examples/few_step_reference.py [--schedule 1.67] [--images 20] [--inner inductor]
"""

import argparse

import torch

import diffopt
from diffopt.evaluation import metrics, zoo
from diffopt.fewstep.sampler import initial_noise

parser = argparse.ArgumentParser()
parser.add_argument("--schedule", default="1.67", help="effective steps, e.g. 1, 1.5, 1.67, 2")
parser.add_argument("--images", type=int, default=20)
parser.add_argument("--inner", default="inductor", choices=["eager", "aot_eager", "inductor"])
args = parser.parse_args()

student = zoo.load("ref-dit-2step")  # distilled from ref-dit; ships with diffopt
sampler = diffopt.unroll(student.model, student.scheduler, args.schedule, sigmas=[1.0, 0.5])
print("schedule:", sampler.describe())

labels = torch.arange(args.images) % 10
noise = initial_noise((1, 16, 16), range(args.images))
if len(sampler.compensation):  # fit the partial step on other seeds than the ones we show
    calibration = initial_noise((1, 16, 16), range(10_000, 10_020))
    fit = diffopt.fit_compensation(sampler, calibration, {"class_labels": torch.arange(20) % 10})
    print(fit.table())

engine = torch.compile(sampler, backend="diffopt", options={"inner": args.inner}, fullgraph=True)
with torch.no_grad():
    images = engine(noise, {"class_labels": labels})
    two_steps = student.sample(labels, range(args.images))  # the full 2-step loop
nfe = sampler.effective_nfe(noise, {"class_labels": labels})
accuracy = metrics.class_accuracy(images, labels)
print(f"effective NFE {nfe:.3f}; classifier accuracy {accuracy:.2f}")
print(f"PSNR against the full 2-step student: {metrics.psnr(images, two_steps):.1f} dB")

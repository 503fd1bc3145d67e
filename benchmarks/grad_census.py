"""Gradient census (issue 11, pretrained-model diagnosis): one KD step on a range-initialised Q,
every parameter's gradient norm relative to its own norm, largest first (quantizer parameters
left out). Shows why a fixed-lr SGD step is 25% of the patch embedding on fmnist_dinov2 and
well under 1e-3 of any weight on fmnist_vit.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/grad_census.py fmnist_dinov2 4w8a
    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/grad_census.py fmnist_vit 4w4a
"""
import sys, torch
sys.path.insert(0,'.')
torch.set_num_threads(1)
from benchmarks.fmnist import load_split, model_input
from maskaq.models import load_model
from maskaq.qmodel import quantize_model, QuantConfig
from maskaq.calibration import TensorBatches, kd_loss
from maskaq.ranges import init_ranges
lm=load_model(sys.argv[1]); P=lm.model.eval(); dc=lm.data_config
xs,_=load_split('train'); idx=torch.randperm(len(xs),generator=torch.Generator().manual_seed(10000))[:32]
x=model_input(xs[idx],dc)
Q=quantize_model(P,QuantConfig.parse(sys.argv[2]))
init_ranges(Q, TensorBatches(x,16), method='mse')
for p in Q.parameters(): p.requires_grad_(True)
with torch.no_grad(): zp=P(x[:16])
loss=kd_loss(Q(x[:16]),zp,5.0); loss.backward()
rows=[]
for n,p in Q.named_parameters():
    if p.grad is None: continue
    rows.append((float(p.grad.norm()/ (p.detach().norm()+1e-12)), float(p.grad.norm()), float(p.detach().norm()), n, tuple(p.shape)))
rows.sort(reverse=True)
print('loss',float(loss))
for r in [r for r in rows if "quantizer" not in r[3]][:14]: print(f'{r[0]:.3e} grad {r[1]:.3e} |p| {r[2]:.3e} {r[3]} {r[4]}')

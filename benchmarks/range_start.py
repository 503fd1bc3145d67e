"""Range start without any training (issue 11): PyTorch fake-quant top-1 of fmnist_vit right after
each way of setting the activation ranges, from 64 real validation-slice images (images 0-63 of the
slice), scored on validation-slice images 1,000-2,999. Never the test set.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/range_start.py
"""
import sys, time, torch
sys.path.insert(0, '.')
torch.set_num_threads(1)
from benchmarks.fmnist import load_split, normalize
from maskaq.models import load_model
from maskaq.qmodel import quantize_model, QuantConfig
from maskaq.ranges import init_ranges
from maskaq.calibration import minmax_calibrate, TensorBatches
lm = load_model('fmnist_vit'); P = lm.model.eval(); dc = lm.data_config
x, y = load_split('val'); xv = normalize(x, dc.mean, dc.std); 
xc, yc = xv[:64], y[:64]; xe, ye = xv[1000:3000], y[1000:3000]
def acc(M):
    with torch.no_grad(): return float((M(xe).argmax(1) == ye).float().mean())*100
print('fp', acc(P))
for tag in ['4w4a', '3w3a']:
    for meth in ['minmax_old', 'lsq', 'minmax', 'percentile', 'mse']:
        Q = quantize_model(P, QuantConfig.parse(tag))
        t=time.time()
        if meth == 'minmax_old': minmax_calibrate(Q, xc)
        elif meth == 'lsq':
            with torch.no_grad(): Q(xc[:16])
        else: init_ranges(Q, TensorBatches(xc, 16), method=meth, weight_clip='mse')
        print(tag, meth, round(acc(Q),2), f'{time.time()-t:.2f}s', flush=True)

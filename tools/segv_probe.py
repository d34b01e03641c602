"""Which bad-input call of the masked cell op crashes (GPU machine only; a diagnostic)."""
import faulthandler
import sys

import torch

import rims_fast.masked_cell as mc

faulthandler.enable()
dev = sys.argv[1]
torch.manual_seed(0)
gates = torch.randn(2, 3, 20, device=dev)
h = torch.randn(2, 3, 5, device=dev)
c = torch.randn(2, 3, 5, device=dev)
mask = torch.rand(2, 3, device=dev) > 0.5
cases = [("half", (gates.half(), h.half(), c.half(), mask)), ("h double", (gates, h.double(), c, mask)),
         ("mask float", (gates, h, c, mask.float())), ("4H", (gates[..., :-1], h, c, mask)),
         ("dim", (gates[0], h, c, mask)), ("h shape", (gates, h[:, :2], c, mask)),
         ("c shape", (gates, h, c[..., :4], mask)), ("mask shape", (gates, h, c, mask[:1]))]
if dev == "cuda":
    cases.append(("h on cpu", (gates, h.cpu(), c, mask)))
for name, args in cases:
    for grad in (False, True):
        print(dev, name, "grad" if grad else "no_grad", flush=True)
        with torch.set_grad_enabled(grad):
            try:
                mc.masked_lstm_cell(*args)
                print("  no error", flush=True)
            except RuntimeError as e:
                print("  RuntimeError:", str(e).splitlines()[0][:150], flush=True)
print("probe done", dev)

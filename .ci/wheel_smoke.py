"""Run from outside the checkout, in a fresh environment with the built wheel installed: the
library imports from the wheel and patches a pipeline built from configs."""
import sys
from pathlib import Path

checkout = Path(sys.argv[1]).resolve()
sys.path.insert(0, str(checkout / "tests"))  # tiny.py only: diffusers and transformers, no agentsd

import torch  # noqa: E402

import agentsd  # noqa: E402
import tiny  # noqa: E402

assert checkout not in Path(agentsd.__file__).resolve().parents, f"agentsd imported from the checkout: {agentsd.__file__}"
assert (Path(agentsd.__file__).parent / "py.typed").is_file()
pipe = tiny.sd_pipeline()
run = lambda: pipe("a red circle", generator=torch.Generator().manual_seed(0), num_inference_steps=2,
                   height=64, width=64, output_type="np").images
plain = run()
agentsd.apply_patch(pipe, ratio=0.5)
patched = run()
agentsd.remove_patch(pipe)
assert abs(patched - plain).max() > 1e-4 and (run() == plain).all()
print(f"wheel OK: agentsd {agentsd.__version__} from {Path(agentsd.__file__).parent}")

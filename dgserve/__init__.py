"""dgserve: serve DiffusionGemma on Ray."""

import os

# CPU results (bit-exact parity, batch invariance) must not depend on the CPU model: pin MKL to its AVX2 code
# path, which gives the same results on Intel and AMD CPUs (dgserve.model.batch_invariance). MKL reads this at
# its first call, so it is set on import; a value the user set wins.
os.environ.setdefault("MKL_CBWR", "AVX2")

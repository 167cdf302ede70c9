# sitecustomize of the SGLang 0.5.23 GPU kit (tests/gpu/build-0523-kit.sh): torch 2.14.1 links against 11 NCCL 2.30
# functions that the GPU image's NCCL 2.28.9 lacks (ncclCommGrow, ncclSignal, ...). Load extension modules with lazy
# binding so that an unresolved function fails only if it is called; single-GPU serving calls none of them.
import os
import sys

sys.setdlopenflags((sys.getdlopenflags() & ~os.RTLD_NOW) | os.RTLD_LAZY)

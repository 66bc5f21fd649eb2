// pybind11 bindings for prefkern._C: one m.def per launcher, nothing else.
// Argument checks live in Python (prefkern/_cuda.py), before any launch.
#include <pybind11/pybind11.h>

#include "gae.h"
#include "logprobs_from_logits.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "prefkern CUDA kernels (raw device pointers; call through prefkern._cuda)";
  m.def("logprobs_from_logits_fwd", &prefkern::logprobs_from_logits_fwd);
  m.def("logprobs_from_logits_bwd", &prefkern::logprobs_from_logits_bwd);
  m.def("gae_scan", &prefkern::gae_scan);
}

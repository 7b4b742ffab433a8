"""Weight codecs for Phase 8 (no model classes here): SeedLM encode/decode, the VPTQ encoder, hyper-compression,
and the byte-counted file formats. The kernels they call live in forge.ops (seedlm, vq)."""

"""TIR/TE kernels edgert's passes call: tree-verification attention, KV append, DHSA."""

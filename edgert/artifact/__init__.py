"""The artifact contract: the manifest (typed sections, graph keys), atomic writes and
verification, and the files a TVM build writes."""

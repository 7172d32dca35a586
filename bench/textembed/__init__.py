"""MiniLM bulk embedding, before and after length-sorted batches on onnxruntime (issue 18)."""

"""Per-GPU memory planning: ``memory`` is the analytic model (parameters, gradients, optimizer state,
activations, logits or the fused head, colocated SGLang), ``plan`` is ``dualrpo plan`` over a recipe or a
preset. Launching (``dualrpo_mcore.launch``) uses it; it needs nothing from the launchers."""

"""Policy models built from Megatron-Core parts."""

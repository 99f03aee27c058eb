"""Tools above the Engine: Medusa-1 self-distillation and head training, head evaluation,
tree tuning."""

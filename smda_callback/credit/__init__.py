"""From optimizer steps to pairs: the credit engine (pure maths) and its torch operations."""

from .engine import CreditEngine, CreditLayout, OptimizerKernel, WindowCredit, read_kernel, replay_credits, shares_from_slopes
from .params import (causal_lm_row_losses, inner_optimizer, is_sharded, measure_step, sharding_check, newest_update, optimizer_step_count, row_slopes, trainable_params,
                     with_decayed_weights, with_update_applied)

__all__ = ["CreditEngine", "CreditLayout", "OptimizerKernel", "WindowCredit", "causal_lm_row_losses", "inner_optimizer", "is_sharded", "measure_step", "sharding_check", "newest_update",
           "optimizer_step_count", "replay_credits", "row_slopes", "shares_from_slopes", "trainable_params", "with_decayed_weights",
           "with_update_applied", "read_kernel"]

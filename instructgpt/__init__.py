"""InstructGPT's alignment pipeline (SFT, reward model, PPO) and DPO, on xllama models."""

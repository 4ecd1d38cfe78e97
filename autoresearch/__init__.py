"""
The harness behind agent_loop.py and prepare.py: fixed code that no agent edits.

    fa3.py       loading Flash Attention 3 from the kernels hub (CUDA, Hopper), with a network probe
    memory.py    peak memory of a training step, counted on fake tensors before anything is allocated
"""

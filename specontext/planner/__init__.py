"""Memory planning (SPECONTEXT.md §3): the memory model, device profiles and the placement plan."""

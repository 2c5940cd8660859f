"""Planning: the problem built from the fleet state, the planners, and the plan they give."""

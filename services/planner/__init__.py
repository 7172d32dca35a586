"""The planner: explorations API, concept sampling, and the loop's bookkeeping."""

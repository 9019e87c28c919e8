"""Local learning: tasks, data partitioning and the Learner that owns a model. Knows nothing of peers."""

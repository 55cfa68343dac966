"""The decision layer: policy documents, decide(), clarification/escalation, tuning, the policy store."""

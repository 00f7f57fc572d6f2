"""sdserve's GPU side: one resident model, batches of queued jobs. Never imports fastapi."""

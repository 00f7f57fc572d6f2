"""sdserve's HTTP front end. Never imports torch or diffusers."""

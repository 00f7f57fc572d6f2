"""The API's routes, one router per resource: submitting jobs (`submit`), reading and canceling
them (`jobs`), OpenAI's images API (`generations`), and the service's own pages and probes
(`service`). Each router is built from the app's `Context`."""

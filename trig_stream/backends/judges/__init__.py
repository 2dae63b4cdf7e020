"""Judge backends: VLM judges that turn an image and a dimension into a TRIGScore.

* :mod:`~trig_stream.backends.judges.openai_judge`: any OpenAI-compatible chat endpoint
  (vLLM, OpenAI), backend name ``openai``;
* :mod:`~trig_stream.backends.judges.templates`: the judging texts and their version;
* :mod:`~trig_stream.backends.judges.http_errors`: how HTTP failures are classified.
"""

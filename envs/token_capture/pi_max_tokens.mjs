// A pi extension (loaded by .venv-gym/pi/bin/pi, written by scripts/setup_pi.sh, when
// MEGAGYM_PI_MAX_TOKENS is set): caps every model request's output at that many tokens.
// pi's openai-completions requests carry no output limit of their own (pi-ai sends one only when a
// caller passes maxTokens), so without it each call generates up to the rest of the context.
export default function maxTokens(pi) {
  const cap = Number(process.env.MEGAGYM_PI_MAX_TOKENS);
  pi.on("before_provider_request", (event) => {
    if (!(cap > 0)) return;
    const payload = { ...event.payload };
    delete payload.max_completion_tokens;
    payload.max_tokens = cap;
    return payload;
  });
}

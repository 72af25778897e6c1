"""The Triton Python-backend model that serves a fastertrt bundle: copied into a
model repository as `<name>/1/model.py` next to the bundle and the runtime's
sources (`lib/`), so the serving environment needs only numpy < 2, onnxruntime
and tokenizers (and tensorrt + cuda-python for engines).

Triton hands `execute` every request its dynamic batcher gathered; they are run
as one padded batch through the runtime and the outputs split back per request.
A bad request gets an error response naming the problem; the others in the
batch are still served. That includes requests beyond the caps in config.pbtxt
(FASTERTRT_MAX_INPUT_TOKENS, _NEW_TOKENS, _BEAMS, _ROWS): one request must not
exhaust the memory the whole batch runs in.
"""

import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils  # only inside tritonserver's Python stub


class BadRequest(ValueError):
    pass


DEFAULT_NEW_TOKENS = 32  # Decoder.generate's default, lowered to the cap where the cap is lower
_OPTIONS = {"FASTERTRT_MAX_INPUT_TOKENS": "--max-input-tokens", "FASTERTRT_MAX_NEW_TOKENS": "--max-new-tokens",
            "FASTERTRT_MAX_BEAMS": "--max-beams", "FASTERTRT_MAX_ROWS": "--max-rows"}


class TritonPythonModel:
    def initialize(self, args):
        here = os.path.join(args["model_repository"], args["model_version"])
        sys.path.insert(0, os.path.join(here, "lib"))
        from fastertrt.runtime import load

        self.config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in self.config.get("parameters", {}).items()}
        self.backend = params.get("FASTERTRT_BACKEND", "onnxruntime")
        threads = int(params.get("FASTERTRT_THREADS", "0")) or None
        self.model = load(os.path.join(here, "bundle"), backend=self.backend, threads=threads)
        self.kind = self.model.manifest["kind"]
        self.outputs = [o["name"] for o in self.config["output"]]
        self.max_length = self.model.max_length
        self.caps = {k: int(params[k]) for k in _OPTIONS if k in params}
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(self.config)

    # --- requests ---------------------------------------------------------------
    def _params(self, request, allowed):
        raw = request.parameters()
        params = json.loads(raw) if raw else {}
        unknown = sorted(set(params) - set(allowed))
        if unknown:
            raise BadRequest(f"unknown parameter(s) {unknown}; this model takes {sorted(allowed) or 'none'}")
        return params

    def _rows(self, request):
        """Token id rows of one request: from TEXT (BYTES [n, 1]) or input_ids (+ attention_mask)."""
        text = pb_utils.get_input_tensor_by_name(request, "TEXT")
        ids = pb_utils.get_input_tensor_by_name(request, "input_ids")
        if (text is None) == (ids is None):
            raise BadRequest("send exactly one of TEXT (BYTES) or input_ids (INT64)")
        if text is not None:
            if self.model.tokenizer is None:
                raise BadRequest("this bundle has no tokenizer: send input_ids")
            texts = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in text.as_numpy().reshape(-1)]
            if any(not t.strip() for t in texts):
                raise BadRequest("TEXT holds an empty string")
            rows = self.model.tokenizer.encode(texts, truncate=False)
        else:
            arr = ids.as_numpy()
            arr = arr.reshape(1, -1) if arr.ndim == 1 else arr  # the streaming model takes one unbatched prompt
            mask = pb_utils.get_input_tensor_by_name(request, "attention_mask")
            mask = mask.as_numpy().reshape(arr.shape[0], -1) if mask is not None else np.ones_like(arr)
            if mask.shape != arr.shape:
                raise BadRequest(f"attention_mask has shape {list(mask.shape)}; input_ids has {list(arr.shape)}")
            rows = [[int(t) for t, m in zip(r, mr) if m] for r, mr in zip(arr, mask)]
            if any(not r for r in rows):
                raise BadRequest("a row of input_ids has no token with attention_mask 1")
            bad = [t for r in rows for t in r if not 0 <= t < self.model.vocab_size]
            if bad:
                raise BadRequest(f"token id {bad[0]} lies outside the vocabulary [0, {self.model.vocab_size})")
        longest = max(len(r) for r in rows)
        if longest > self.max_length:
            raise BadRequest(f"a row has {longest} tokens; this model takes at most {self.max_length}")
        self._cap("FASTERTRT_MAX_INPUT_TOKENS", longest, "a row's token count")
        return rows

    def _cap(self, key, value, what):
        cap = self.caps.get(key)
        if cap is not None and value > cap:
            raise BadRequest(f"{what} {value} is above this model's cap of {cap} ({key} in its config.pbtxt); "
                             f"ask for less or split the request, or export the repository again with "
                             f"{_OPTIONS[key]} N (fastertrt export-triton or serve)")

    def _check_caps(self, rows, kw):
        """Cap the request's new tokens, beams and rows (prompts x beams), which set
        the memory its generation takes."""
        kw.setdefault("max_new_tokens", min(DEFAULT_NEW_TOKENS, self.caps.get("FASTERTRT_MAX_NEW_TOKENS",
                                                                               DEFAULT_NEW_TOKENS)))
        beams = kw.get("num_beams", 1)
        self._cap("FASTERTRT_MAX_NEW_TOKENS", kw["max_new_tokens"], "max_new_tokens")
        self._cap("FASTERTRT_MAX_BEAMS", beams, "num_beams")
        self._cap("FASTERTRT_MAX_ROWS", len(rows) * max(beams, 1), f"{len(rows)} prompt(s) x {beams} beam(s) =")
        return kw

    def execute(self, requests):
        if self.decoupled:
            for request in requests:
                self._stream(request)
            return None
        responses = [None] * len(requests)
        work = []  # (request index, rows, generation options)
        for i, request in enumerate(requests):
            try:
                if self.kind == "encoder":
                    work.append((i, self._rows(request), self._params(request, ())))
                    continue
                allowed = ("max_new_tokens", "min_new_tokens", "num_beams", "length_penalty", "eos_token_id",
                           "early_stopping")
                rows = self._rows(request)
                kw = self._check_caps(rows, self._generation_options(self._params(request, allowed)))
                work.append((i, rows, kw))
            except (BadRequest, ValueError, TypeError) as exc:  # a bad parameter value fails its request only
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc)))
        if self.kind == "encoder":
            self._encode(work, responses)
        else:
            for i, rows, kw in work:
                responses[i] = self._generate(rows, kw)
        return responses

    def _encode(self, work, responses):
        if not work:
            return
        rows = [r for _, request_rows, _ in work for r in request_rows]
        try:
            out = self.model.encode(rows)
        except Exception as exc:  # noqa: BLE001 - any failure must become an error response, never a crash
            for i, _, _ in work:
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc)))
            return
        start = 0
        for i, request_rows, _ in work:
            n, width = len(request_rows), max(len(r) for r in request_rows)
            tensors = []
            for name in self.outputs:
                value = out[name][start:start + n]
                if value.ndim == 3:  # per-token outputs: this request's own padded length
                    value = value[:, :width]
                tensors.append(pb_utils.Tensor(name, np.ascontiguousarray(value)))
            responses[i] = pb_utils.InferenceResponse(output_tensors=tensors)
            start += n

    @staticmethod
    def _generation_options(params):
        """Request parameters as Decoder.generate's keyword arguments."""
        kw = {k: int(params[k]) for k in ("max_new_tokens", "min_new_tokens", "num_beams") if k in params}
        if "length_penalty" in params:
            kw["length_penalty"] = float(params["length_penalty"])
        if "early_stopping" in params:
            kw["early_stopping"] = params["early_stopping"]
        if "eos_token_id" in params:
            kw["eos_token_id"] = [int(e) for e in str(params["eos_token_id"]).split(",")]
        return kw

    def _generate(self, rows, kw):
        try:
            gen = self.model.generate(rows, **kw)
        except Exception as exc:  # noqa: BLE001 - InputError names the bad option; nothing may crash the stub
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc)))
        width = max(len(t) for t in gen.new_tokens)
        ids = np.full((len(gen.new_tokens), width), -1, dtype=np.int64)
        for r, t in enumerate(gen.new_tokens):
            ids[r, :len(t)] = t
        texts = np.array([(t or "").encode("utf-8") for t in (gen.texts or [""] * len(gen.new_tokens))],
                         dtype=object).reshape(-1, 1)
        tensors = {"TEXT_OUT": texts, "token_ids": ids, "scores": np.asarray(gen.scores, np.float32).reshape(-1, 1)}
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(n, tensors[n]) for n in self.outputs])

    def _stream(self, request):
        """Greedy generation, one response per new token (its id and the text it adds),
        then the final flag; an error ends the stream with an error response."""
        sender = request.get_response_sender()
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        try:
            rows = self._rows(request)
            params = self._params(request, ("max_new_tokens", "min_new_tokens", "eos_token_id"))
            kw = self._check_caps(rows[:1], self._generation_options(params))
            tokens, said = [], [""]

            def on_token(step, new):
                tokens.append(int(new[0]))
                text = self.model.tokenizer.decode(tokens) if self.model.tokenizer else ""
                piece, said[0] = text[len(said[0]):] if text.startswith(said[0]) else text, text
                sender.send(pb_utils.InferenceResponse(output_tensors=[
                    pb_utils.Tensor("TEXT_OUT", np.array([piece.encode("utf-8")], dtype=object)),
                    pb_utils.Tensor("token_ids", np.array([tokens[-1]], dtype=np.int64))]))

            self.model.generate(rows[:1], num_beams=1, on_token=on_token, **kw)
            sender.send(flags=final)
        except Exception as exc:  # noqa: BLE001 - the stream must end with the error, never hang
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))), flags=final)

    def finalize(self):
        self.model = None

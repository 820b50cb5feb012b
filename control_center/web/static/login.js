// The console's log-in form: POST /api/login, then the console at "/".
"use strict";

(function () {
  const form = document.getElementById("login-form");
  const username = document.getElementById("username");
  const password = document.getElementById("password");
  const errorLine = document.getElementById("login-error");
  const submit = document.getElementById("login-submit");

  function showError(text) {
    errorLine.textContent = text;
    // Mark the fields so assistive technology announces them as wrong, not only the line.
    const bad = text !== "";
    username.setAttribute("aria-invalid", String(bad));
    password.setAttribute("aria-invalid", String(bad));
  }

  async function errorText(response) {
    try {
      const body = await response.json();
      if (body && typeof body.error === "string" && body.error) return body.error;
    } catch (_) {
      // not JSON: fall through to the status line
    }
    return `Log-in failed (HTTP ${response.status}).`;
  }

  async function logIn(event) {
    event.preventDefault();
    if (!username.value.trim() || !password.value) {
      showError("Enter your user name and password.");
      (username.value.trim() ? password : username).focus();
      return;
    }
    showError("");
    submit.disabled = true;
    submit.textContent = "Logging in…";
    try {
      const response = await fetch("/api/login", {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json", Accept: "application/json" },
        body: JSON.stringify({ username: username.value.trim(), password: password.value }),
      });
      if (response.ok) {
        window.location.assign("/");
        return;
      }
      showError(await errorText(response));
      password.value = "";
      password.focus();
    } catch (_) {
      showError("Cannot reach the control centre server. Check the network and try again.");
    } finally {
      submit.disabled = false;
      submit.textContent = "Log in";
    }
  }

  form.addEventListener("submit", logIn);
})();

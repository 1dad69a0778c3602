import { defineConfig } from "vite";

// The dashboard is served by the gateway from the same origin as the API (docs/dashboard.md), so the
// build uses relative asset paths and no dev proxy is needed when `vite` runs with MAW_GATEWAY set.
export default defineConfig({
  base: "./",
  esbuild: { jsx: "automatic", jsxImportSource: "preact" },
  build: { outDir: "dist", emptyOutDir: true, sourcemap: true, target: "es2022" },
  server: process.env.MAW_GATEWAY
    ? { proxy: { "^/(maw|grpc)\\.": { target: process.env.MAW_GATEWAY, changeOrigin: true } } }
    : {},
});

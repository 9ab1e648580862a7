/**
 * The entry point of the AWS SDK's bundle (`npm run build`: esbuild makes
 * dist/src/cli/s3-sdk.bundle.js of it, and ../../cli/code-cache.ts its code cache): the S3
 * client package and everything it loads, as one file that ./s3-sdk-ops.ts loads with that cache.
 * Nothing in src/ imports this module.
 */
export * from '@aws-sdk/client-s3';
